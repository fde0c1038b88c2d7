"""Accounts and personal API tokens: who may call the service, and as whom."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update

from opt.access.auth import Principal, new_token, token_hash
from opt.access.db import EMAIL_LEN, TEXT_LEN, ApiToken, Role, User
from opt.access.errors import AccessError, Conflict, NotFound
from opt.access.mail import Mail
from opt.access.names import clean_text, normalise_name, skeleton

EMAIL_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.!#$%&'*+/=?^_`{|}~-@")


@dataclass(frozen=True)
class NewToken:
    """A token as made: `token` is shown this once and never stored."""

    id: int
    token: str
    expires_at: datetime


def check_email(raw: str) -> str:
    email = clean_text(raw, "email", EMAIL_LEN)
    local, at, domain = email.lower().rpartition("@")
    if not at or not local or "." not in domain or domain.startswith(".") or domain.endswith(".") or not set(email.lower()) <= EMAIL_CHARS:
        raise AccessError("email does not look like an email address (name@institution.org, ASCII)")
    return email


class Accounts(Mail):
    def add_user(self, name: str, email: str, role: str, by: str = "operator") -> tuple[User, NewToken]:
        """Create an account and its first token (an operator on the database's host, or an admin through the API)."""
        norm = normalise_name(name, "account name")
        email = check_email(email)
        if role not in set(Role):
            raise AccessError(f"role {role!r} is not one of {', '.join(Role)}")
        now = self._now()
        with self._sessions.begin() as s:
            clash = s.scalars(select(User).where(or_(User.name == norm, User.skeleton == skeleton(norm)))).first()
            if clash is not None:
                what = "is taken" if clash.name == norm else f"looks like the existing account {clash.name!r}"
                raise Conflict(f"account name {norm!r} {what}; choose another")
            user = User(name=norm, skeleton=skeleton(norm), email=email, role=role, created_at=now)
            s.add(user)
            s.flush()
            token = self._new_token(s, user, "first token", self.limits.token_days, by)
            self._audit(s, by, "user.created", f"user:{user.id}", {"name": norm, "role": role})
        return user, token

    def create_user(self, actor: Principal, name: str, email: str, role: str) -> tuple[User, NewToken]:
        self._need_admin(actor, "user.create", "user")
        try:
            return self.add_user(name, email, role, by=actor.name)
        except AccessError as e:
            self._refuse(actor, "user.create", "user", e)

    def user_of(self, actor: Principal) -> User:
        """The caller's own account (its email, for the pages)."""
        with self._sessions() as s:
            user = s.get(User, actor.user_id)
        if user is None:
            raise NotFound("your account is gone")
        return user

    def list_users(self, actor: Principal) -> list[User]:
        self._need_admin(actor, "user.list", "user")
        with self._sessions() as s:
            return list(s.scalars(select(User).order_by(User.id)))

    def operator_token(self, name: str, label: str = "issued by an operator") -> NewToken:
        """A new token for an existing account, made on the database's host (a lost token; the access demo)."""
        norm = normalise_name(name, "account name")
        with self._sessions.begin() as s:
            user = s.scalars(select(User).where(User.name == norm)).one_or_none()
            if user is None:
                raise NotFound(f"no account {norm!r}; create it with `optctl access user add`")
            return self._new_token(s, user, label, self.limits.token_days, "operator")

    def principal_for_token(self, token: str) -> Principal | None:
        """The account behind a token in force (not expired, not revoked, account not disabled), else None."""
        now = self._now()
        with self._sessions() as s:
            row = s.scalars(select(ApiToken).where(ApiToken.token_hash == token_hash(token))).one_or_none()
            if row is None or row.revoked_at is not None or now >= row.expires_at or row.user.disabled_at is not None:
                return None
            return Principal(row.user.id, row.user.name, Role(row.user.role))

    def auth_refused(self, client: str, reason: str) -> None:
        """Audit a request that carried no valid credentials (the API calls this; `client` is its address)."""
        with self._sessions.begin() as s:
            self._audit(s, "anonymous", "auth.refused", f"client:{client}"[:64], {"reason": reason})

    def input_refused(self, actor: str, route: str, reason: str, client: str) -> None:
        """Audit a request the HTTP layer refused before it reached a rule (malformed or oversized body, bad id)."""
        with self._sessions.begin() as s:
            self._audit(s, actor, "input.refused", route[:64], {"reason": reason[:500], "client": client})

    def issue_token(self, actor: Principal, label: str, days: int | None = None) -> NewToken:
        days = self._bounded(actor, "token.create", f"user:{actor.user_id}", "days", days, self.limits.token_days, self.limits.token_days)
        label = self._text(actor, "token.create", f"user:{actor.user_id}", label, "label", TEXT_LEN)
        with self._sessions.begin() as s:
            user = s.get(User, actor.user_id)
            assert user is not None
            return self._new_token(s, user, label, days, actor.name)

    def list_tokens(self, actor: Principal) -> list[ApiToken]:
        with self._sessions() as s:
            return list(s.scalars(select(ApiToken).where(ApiToken.user_id == actor.user_id).order_by(ApiToken.id)))

    def revoke_token(self, actor: Principal, token_id: int) -> ApiToken:
        subject = f"token:{token_id}"
        with self._sessions.begin() as s:
            row = s.get(ApiToken, token_id)
            visible = row is not None and (row.user_id == actor.user_id or actor.is_admin)
            if visible and row is not None and row.revoked_at is None:
                s.execute(update(ApiToken).where(ApiToken.id == token_id).values(revoked_at=self._now()))
                self._audit(s, actor.name, "token.revoked", subject, {"owner": row.user.name})
                s.refresh(row)
                return row
        if not visible:
            self._refuse(actor, "token.revoke", subject, NotFound(f"no token {token_id} of yours"))
        self._refuse(actor, "token.revoke", subject, Conflict(f"token {token_id} is already revoked"))

    def _new_token(self, s, user: User, label: str, days: int, by: str) -> NewToken:  # type: ignore[no-untyped-def]
        token, now = new_token(), self._now()
        row = ApiToken(user_id=user.id, token_hash=token_hash(token), label=label, created_at=now, expires_at=now + timedelta(days=days))
        s.add(row)
        s.flush()
        self._audit(s, by, "token.created", f"token:{row.id}", {"owner": user.name, "expires_at": row.expires_at.isoformat()})
        return NewToken(row.id, token, row.expires_at)
