"""The machinery lmforge runs on: processes, S3, the embedded S3 server, DVC, the Prefect server, torchrun.

It knows nothing of the stages: it imports only the standard library and third-party packages, never
`pipeline`, `flows`, `benchmarks` or `lmforge`, and takes its settings as plain values or duck-typed
config objects (see the Protocols in each module).
"""
