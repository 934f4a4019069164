"""Tests use the simulator's throwaway PostgreSQL cluster (never a shared database)."""

from edgewise.sim._postgres import _bin_dir as pg_bin_dir
from edgewise.sim._postgres import throwaway_postgres

__all__ = ["pg_bin_dir", "throwaway_postgres"]
