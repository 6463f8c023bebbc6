"""What the broker's servicers share: the components :class:`broker.app.Broker` builds.

Defined here, beside the servicers, so that they and the composition root do not import each
other: :mod:`broker.app` builds one :class:`BrokerContext` and hands it to each servicer.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric import ed25519

from broker import config as config_mod
from broker.auth import BrokerAuthorizer
from broker.ca import CertificateAuthority, ServerCertificate
from broker.ca_rotation import CaRotation
from broker.clouds import CloudManager
from broker.commands import CommandDispatcher
from broker.drills import DrillManager
from broker.failback import FailbackManager
from broker.failover import FailoverManager
from broker.heartbeats import HeartbeatWriter
from broker.jobs import JobManager
from broker.plans import PlanManager
from broker.protection import ProtectionManager
from broker.reports import ReplicationReports
from broker.servers import ServerOperations
from broker.sessions import SessionRegistry
from broker.store.base import Store
from sitepair.clock import Clock


@dataclasses.dataclass
class BrokerContext:
    """What the services share. Built once by :class:`Broker`."""

    config: config_mod.BrokerConfig
    clock: Clock
    store: Store
    ca: CertificateAuthority
    server_cert: ServerCertificate
    authorizer: BrokerAuthorizer
    sessions: SessionRegistry
    jobs: JobManager
    dispatcher: CommandDispatcher
    heartbeats: HeartbeatWriter
    servers: ServerOperations
    clouds: CloudManager
    protection: ProtectionManager
    reports: ReplicationReports
    failover: FailoverManager
    failback: FailbackManager
    plans: PlanManager
    drills: DrillManager
    ticket_key: ed25519.Ed25519PrivateKey
    started_at: float
    ca_rotation: CaRotation
    bound_enrollment: str = ""
    bound_control: str = ""
    #: Where the web dashboard listens ("" = off: ``[dashboard] enabled = false``).
    bound_dashboard: str = ""

    def enrollment_addresses(self) -> list[str]:
        return list(self.config.advertise.enrollment) or [self.bound_enrollment]

    def control_addresses(self) -> list[str]:
        return list(self.config.advertise.control) or [self.bound_control]
