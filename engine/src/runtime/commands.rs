//! Step commands built from a saga's state: shared by the engine's driver and by the operator
//! actions (`ops::act`), which commit the commands an action dispatches to the outbox.

use sagaflow_protocol::{PROTOCOL_VERSION, StepCommand};

use crate::machine::{Dispatch, SagaState};

/// The protocol command for one attempt the machine dispatched from `state` (the state after
/// the transition, whose input and outputs the worker reads).
pub(crate) fn command_for(state: &SagaState, dispatch: Dispatch) -> StepCommand {
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
