"""``python -m kdcache`` (also what ``torchrun -m kdcache`` runs)."""

from kdcache.cli import main

raise SystemExit(main())
