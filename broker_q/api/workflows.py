"""``/v1/workflows``: a workflow's steps, what blocks them and its critical path; cancelling it."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from broker_q.access import Permission
from broker_q.api.auth import CallerDep
from broker_q.api.errors import errors
from broker_q.api.models import CancelRequest, WorkflowView
from broker_q.api.tasks import not_found
from broker_q.workflows import Workflows, status_json

__all__ = ["router"]

router = APIRouter(prefix="/v1/workflows", tags=["workflows"])



@router.get("/{workflow_id}", response_model=WorkflowView, responses=errors(401, 403, 404, 422, 503),
            summary="A workflow's status")
def get_workflow(workflow_id: uuid.UUID, caller: CallerDep) -> WorkflowView:
    """Each step's state, what each blocked step waits for, and the critical path (``broker-q workflow ID``)."""
    workflows = Workflows(caller.context.app)
    with not_found(f"no workflow with id {workflow_id}"):
        state = workflows.state(workflow_id)
    caller.authorize_record(Permission.READ, state.tenant, f"read workflow {workflow_id}",
                            f"no workflow with id {workflow_id}")
    return WorkflowView.model_validate(status_json(workflows.status(workflow_id)))


@router.post("/{workflow_id}/cancel", response_model=WorkflowView,
             responses=errors(400, 401, 403, 404, 409, 422, 503), summary="Cancel a workflow")
def cancel_workflow(workflow_id: uuid.UUID, body: CancelRequest, caller: CallerDep) -> WorkflowView:
    """Cancel the workflow and every step of it that is not final (running steps are asked to stop).
    409 if it was cancelled already or has no step left to cancel."""
    workflows = Workflows(caller.context.app)
    with not_found(f"no workflow with id {workflow_id}"):
        state = workflows.state(workflow_id)
    caller.authorize_record(Permission.CANCEL, state.tenant, f"cancel workflow {workflow_id}",
                            f"no workflow with id {workflow_id}")
    return WorkflowView.model_validate(status_json(workflows.cancel(workflow_id, reason=body.reason,
                                                                    actor=caller.actor)))
