"""The director repository: per-device signed instructions (`trust._director`)."""
