"""One module per question the tool answers; each is one library function returning a
DataFrame (or dataclasses): ``spectrum``, ``recommend``, ``compress``."""
