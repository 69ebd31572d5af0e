"""model: pure model definitions (text decoder, encoders, drafter) and the checkpoint loader. Modules
call gemma4rt.ops; no scheduling, no IPC, no global state. Inputs arrive in a ForwardContext."""
