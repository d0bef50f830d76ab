"""The root of the project's exception types. Anything a user can cause (a bad file, an
impossible request, an unreachable swarm) raises a subclass, so the CLIs can print one line for it
and exit non-zero instead of showing a traceback."""


class HelixError(Exception):
    """An error a user can act on; its message is the whole explanation."""
