"""`python -m balancer` runs the same CLI as the console script."""

from balancer.cli import main

raise SystemExit(main())
