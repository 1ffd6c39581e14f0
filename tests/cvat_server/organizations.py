"""Organizations and memberships on the test CVAT server, shaped as CVAT 2.73 answers them.

A user sees the organizations they belong to (an admin sees all); memberships are listed for the
organization of the request's context (``X-Organization`` or ``?org=``), else for every organization
the user sees. Membership ids are derived (``org_id * 1000 + user_id``): the server keeps members as
a ``{user_id: role}`` map and nothing here creates memberships through the API.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, g, jsonify

from . import api
from .state import SEED_DATE, CvatState


def organization_json(st: CvatState, org: dict[str, Any], base: str) -> dict[str, Any]:
    return {
        "id": org["id"],
        "slug": org["slug"],
        "name": org["name"],
        "description": org.get("description", ""),
        "created_date": org.get("created_date", SEED_DATE),
        "updated_date": org.get("updated_date", SEED_DATE),
        "contact": dict(org.get("contact", {})),
        "owner": st.basic_user(org["owner_id"], base),
    }


def membership_json(st: CvatState, org: dict[str, Any], user_id: int, base: str) -> dict[str, Any]:
    return {
        "id": org["id"] * 1000 + user_id,
        "user": st.basic_user(user_id, base),
        "organization": org["id"],
        "is_active": True,
        "joined_date": org.get("created_date", SEED_DATE),
        "role": org["members"][user_id],
        "invitation": None,
    }


def _visible(st: CvatState) -> list[dict[str, Any]]:
    """Organizations the caller may see, newest first."""
    admin = st.users[g.user_id]["is_superuser"]
    return [o for o in sorted(st.organizations.values(), key=lambda o: -o["id"])
            if admin or g.user_id in o["members"]]


def organizations_list() -> Any:
    st = api.server().state
    with st.lock:
        return jsonify(api.paginate([organization_json(st, o, api.base_url()) for o in _visible(st)]))


def organization_detail(org_id: int) -> Any:
    st = api.server().state
    with st.lock:
        org = next((o for o in _visible(st) if o["id"] == org_id), None)
        if org is None:
            api.not_found("Organization")
        return jsonify(organization_json(st, org, api.base_url()))


def memberships_list() -> Any:
    st = api.server().state
    with st.lock:
        orgs = [st.organizations[g.org_id]] if g.org_id is not None else _visible(st)
        items = [membership_json(st, org, user_id, api.base_url())
                 for org in orgs for user_id in sorted(org["members"])]
        return jsonify(api.paginate(items))


def register(app: Flask) -> None:
    """Routes of ``/api/organizations`` and ``/api/memberships`` (read-only)."""
    app.add_url_rule("/api/organizations", "organizations_list", organizations_list, methods=["GET"])
    app.add_url_rule("/api/organizations/<int:org_id>", "organization_detail", organization_detail,
                     methods=["GET"])
    app.add_url_rule("/api/memberships", "memberships_list", memberships_list, methods=["GET"])
