"""The site's types as response models."""

from __future__ import annotations

from .schemas import Algorithm, BindingOut, DhtBindingOut, RegistrationOut, UserOut
from .services import Binding, DhtBinding, Registration, UserRecord


def binding_out(b: Binding, now: float) -> BindingOut:
    return BindingOut(
        contact=b.contact,
        expires_in=b.remaining(now),
        expires_at=b.expires_at,
        q=b.q,
        source=b.source,
        call_id=b.call_id,
        cseq=b.cseq,
        instance=b.instance,
        reg_id=b.reg_id,
        path=list(b.path),
        registered_at=b.registered_at,
    )


def dht_binding_out(b: DhtBinding, now: float) -> DhtBindingOut:
    return DhtBindingOut(
        contact=b.contact,
        home=b.home,
        site=b.site,
        key_id=b.key_id,
        expires_in=b.expires_in(now),
        expires_at=b.expires_at,
        q=b.q,
        version=b.version,
        instance=b.instance,
        reg_id=b.reg_id,
    )


def registration_out(r: Registration, now: float) -> RegistrationOut:
    return RegistrationOut(aor=r.aor, bindings=[binding_out(b, now) for b in r.bindings])


def user_out(record: UserRecord, realm: str) -> UserOut:
    algorithms: list[Algorithm] = []
    if record.ha1_md5 is not None:
        algorithms.append("MD5")
    if record.ha1_sha256 is not None:
        algorithms.append("SHA-256")
    return UserOut(username=record.username, realm=realm, algorithms=algorithms)
