"""`python -m loraplex ...` is the `loraplex` command (what `accelerate launch -m loraplex train ...` runs)."""
from .cli import main

main()
