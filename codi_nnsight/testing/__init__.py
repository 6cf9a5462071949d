"""Public test helpers: tiny CODI models in the official layout, random models of real shapes."""
