"""runtime: actor base class, mailboxes (in-process queues; msgspec frames over local sockets),
process launch and supervision. Receives and emits protocol messages only. No ML imports."""
