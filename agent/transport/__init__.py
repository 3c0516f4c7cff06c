"""gRPC transport for Parley: the biller service (`server`) and the error mapping both sides share (`status`)."""
