"""The `recsys` command: argument parsing (main), the local stack (stack) and
the gateway client (client). The top layer: it may import everything below."""
