"""The Redis stores' settings, here so that a service's configuration can
check them without importing redis-py (a third of a replica's imports,
which every restart waits for)."""

MODES = ("single", "cluster")
# How the store checks the server's persistence when it opens:
#   always    - appendonly yes, appendfsync always: an acknowledged batch is on
#               disk, and survives a crash of Redis or of the machine (default);
#   everysec  - also accepts appendfsync everysec: survives a crash of Redis,
#               but a machine crash or power loss can lose about the last second;
#   unchecked - no check (e.g. a managed Redis that refuses CONFIG GET).
DURABILITY_LEVELS = ("always", "everysec", "unchecked")
