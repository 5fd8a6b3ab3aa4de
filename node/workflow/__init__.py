"""The workflow stage: the UPS Task Manager (IHE AI Workflow for Imaging) over DIMSE.

``states`` is the Unified Procedure Step state machine of PS3.4 CC.1.1 (pure), ``table`` the
durable rows (workitems, subscriptions, the event outbox), ``manager`` the operations of the
UPS Push, Pull and Watch SOP classes on those rows, ``scp`` the pynetdicom handlers the receiver
binds, ``events`` the N-EVENT-REPORT sender (UPS Event SCU) that empties the outbox.

Extension points, not built yet: a Task Performer (claims workitems and runs analyses: it would
use ``manager.change_state`` like any Pull SCU), Q/R retrieval of a workitem's inputs, and
UPS-RS (the same ``manager`` operations behind the admin API and a WebSocket).
"""
