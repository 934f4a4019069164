"""Fleet simulation: real Edgewise servers and agents driven on one machine."""

from ._processes import AgentProcess, ServerProcess, edgewise_command, free_port

__all__ = ["AgentProcess", "ServerProcess", "edgewise_command", "free_port"]
