"""gRPC plumbing every server and client shares: bootstrap, health, status
mapping, deadlines, channels, env config, metrics, protobuf <-> numpy.
The only layer of the library that imports gRPC."""
