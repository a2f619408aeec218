"""The structsim operator: SimilarityService resources → per-GPU-type DaemonSets, tune Jobs, status.

Never imports similarity_service (torch); it runs in an image without either.
"""
