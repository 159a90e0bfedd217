"""`python -m flashfuse explain pkg.module:factory`: see flashfuse.cli."""
from flashfuse.cli import main

raise SystemExit(main())
