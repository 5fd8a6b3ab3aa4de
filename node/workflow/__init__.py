"""Workflow: the node as a DICOM workflow participant (UPS task manager/performer, Q/R retrieval)."""
