"""`python -m codi_nnsight` = the `codi-nnsight` command."""

from .cli import main

main(prog_name="codi-nnsight")
