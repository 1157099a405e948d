"""The arena: benchmark frozen encoders on task suites (WSI classification, survival, ROI, retrieval, VQA, reports).

tasks.py (specs, suites) -> splits.py (patient-level splits) -> runner.py (jobs, results) -> one handler module
per category (wsi_cls.py, survival.py, ...) -> metrics.py (registry + bootstrap). See runner.py for the handler
interface and the result layout.
"""
