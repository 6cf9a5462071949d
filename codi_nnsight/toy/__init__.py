"""The bundled toy CODI model: its training code (`train`); its weights live in `assets/toy-codi`."""
