"""sitepair: open disaster-recovery replication for virtual machines (shared code)."""

__version__ = "0.1.0"
#: The control and replication protocols' version. 2: statuses, refusals and command results
#: are typed (enums and a result message per command), on field numbers protocol 1 did not use;
#: a broker refuses agents of an older protocol, which would be misread (see
#: ``MIN_AGENT_PROTOCOL`` in broker/services/control.py).
PROTOCOL_VERSION = 2
