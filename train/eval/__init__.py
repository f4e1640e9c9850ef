"""Evaluation: V-STaR and STGR splits, the free-form judge, resumable per-sample inference, reports."""
