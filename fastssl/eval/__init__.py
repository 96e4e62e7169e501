"""Evaluation: linear / kNN probes and AUROC with bootstrap intervals (fastssl.eval.probe)."""
