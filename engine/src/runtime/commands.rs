//! Step commands built from a saga's state: shared by the engine's driver and by the operator
//! actions (`ops::act`), which commit the commands an action dispatches to the outbox.

use sagaflow_protocol::{PROTOCOL_VERSION, StepCommand, names};

use crate::machine::{Dispatch, SagaState};

/// Where a saga's commands come from: its partition, and the epoch under which the sender holds
/// (or, for an operator's action, last saw held) the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub partition: u32,
    pub epoch: u64,
}

/// The protocol command for one attempt the machine dispatched from `state` (the state after
/// the transition, whose input and outputs the worker reads).
pub(crate) fn command_for(state: &SagaState, dispatch: Dispatch, route: Route) -> StepCommand {
    StepCommand {
        v: PROTOCOL_VERSION,
        command_id: StepCommand::id_for(
            state.saga_id,
            &dispatch.step_name,
            dispatch.direction,
            dispatch.attempt,
        ),
        saga_id: state.saga_id,
        saga: state.name.clone(),
        saga_version: state.version,
        partition: route.partition,
        epoch: route.epoch,
        reply_to: names::reply_subject(route.partition, &state.name),
        step_index: dispatch.step,
        step: dispatch.step_name,
        direction: dispatch.direction,
        attempt: dispatch.attempt,
        idempotency_key: dispatch.idempotency_key,
        forward_key: dispatch.forward_key,
        deadline: dispatch.deadline,
        input: state.input.clone(),
        outputs: state.outputs.clone(),
    }
}
