"""The workflow stage: the node as a DICOM workflow participant (IHE AI Workflow for Imaging).

``states`` is the Unified Procedure Step state machine of PS3.4 CC.1.1 (pure), ``table`` the
durable rows (workitems, subscriptions, the event outbox), ``manager`` the operations of the
UPS Push, Pull and Watch SOP classes on those rows, ``scp`` the pynetdicom handlers the receiver
binds, ``events`` the N-EVENT-REPORT sender (UPS Event SCP) that empties the outbox.
``retrieve`` fetches a study from a PACS (C-MOVE, C-GET, WADO-RS) and ``ondemand`` runs one
analysis on it on request (`ainode run`, the API).

UPS-RS (DICOMweb, PS3.18 section 11) serves the same ``manager`` operations on the admin API
(``node.admin.routes_workitems``), its WebSocket event channel reading the ``events`` outbox.

``performer`` is the node's Task Performer: it claims the workitems whose code names one of its
analyses through ``manager`` like any Pull SCU, fetches their inputs with ``retrieve``, queues
the analysis through ``ondemand.queue_analysis``, and mirrors every other job as a workitem.
"""
