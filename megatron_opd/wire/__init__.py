"""SGLang's wire, one low package for every side of it: the vendored request schema (contract), the
HTTP client, the binary score codec, the server launchers (`opd serve`, `sglang.launch_server`) and
the failover policy shared by the rollout and teacher pools."""
