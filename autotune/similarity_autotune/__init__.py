"""structsim autotune: an Optuna study of the serving knobs (precision, batch size, max wait) on this device.

Each trial drives the service's own micro-batcher and engine in-process under an open-loop workload and
measures the highest sustained throughput whose p99 latency meets the SLO. See docs/autotune.md.
"""
