"""The workflow stage: the node as a DICOM workflow participant (IHE AI Workflow for Imaging).

``states`` is the Unified Procedure Step state machine of PS3.4 CC.1.1 (pure), ``table`` the
durable rows (workitems, subscriptions, the event outbox), ``manager`` the operations of the
UPS Push, Pull and Watch SOP classes on those rows, ``scp`` the pynetdicom handlers the receiver
binds, ``events`` the N-EVENT-REPORT sender (UPS Event SCP) that empties the outbox.
``retrieve`` fetches a study from a PACS (C-MOVE, C-GET, WADO-RS) and ``ondemand`` runs one
analysis on it on request (`ainode run`, the API).

UPS-RS (DICOMweb, PS3.18 section 11) serves the same ``manager`` operations on the admin API
(``node.admin.routes_workitems``), its WebSocket event channel reading the ``events`` outbox.

Extension point, not built yet: a Task Performer (claims workitems and runs analyses: it would
use ``manager.change_state`` like any Pull SCU and ``retrieve`` for inputs the node lacks).
"""
