//! A seeded random walk over several definitions that checks the invariants after every
//! event.

use super::*;

/// Retry delays drawn from a seeded RNG: sometimes zero, sometimes exact, sometimes anything up
/// to the cap.
struct SeededDelays(StdRng);

impl RetryDelays for SeededDelays {
    fn retry_delay(&mut self, policy: &RetryPolicy, attempts_made: u32) -> Duration {
        match self.0.gen_range(0..4) {
            0 => Duration::ZERO,
            1 => ExactDelays.retry_delay(policy, attempts_made),
            _ => Duration::from_millis(
                self.0
                    .gen_range(0..=policy.max_interval().as_millis() as u64),
            ),
        }
    }
}

fn policy(attempts: Option<u32>) -> RetryPolicy {
    let builder = RetryPolicy::builder()
        .initial_interval(Duration::from_millis(50))
        .max_interval(Duration::from_millis(400))
        .non_retryable("invalid_request");
    match attempts {
        Some(n) => builder.max_attempts(n),
        None => builder.unlimited_attempts(),
    }
    .build()
    .unwrap()
}

fn random_step(
    name: &str,
    kind: StepKind,
    attempts: Option<u32>,
    timeout: Option<u64>,
) -> StepSpec {
    StepSpec {
        name: name.into(),
        kind,
        retry: policy(attempts),
        compensation_retry: policy(Some(2)),
        timeout: timeout.map(Duration::from_millis),
        // The machine never reads the step types.
        input_schema: None,
        output_schema: None,
        secret_output: Vec::new(),
    }
}

fn random_specs() -> Vec<SagaSpec> {
    vec![
        scenarios::order_spec(),
        scenarios::order_spec_with_deadline(),
        SagaSpec {
            name: "no_pivot".into(),
            version: 1,
            steps: vec![
                random_step("a", StepKind::Compensatable, Some(2), Some(300)),
                random_step("b", StepKind::Compensatable, Some(1), None),
                random_step("c", StepKind::Compensatable, Some(3), Some(200)),
            ],
            deadline: Some(Duration::from_millis(1_500)),
            secret_input: Vec::new(),
        },
        SagaSpec {
            name: "pivot_first".into(),
            version: 3,
            steps: vec![
                random_step("go", StepKind::Pivot, Some(1), Some(300)),
                random_step("then", StepKind::Retriable, Some(3), Some(300)),
                random_step("finally", StepKind::Retriable, None, None),
            ],
            deadline: Some(Duration::from_millis(500)),
            secret_input: Vec::new(),
        },
        SagaSpec {
            name: "single".into(),
            version: 1,
            steps: vec![random_step(
                "only",
                StepKind::Compensatable,
                Some(2),
                Some(100),
            )],
            deadline: None,
            secret_input: Vec::new(),
        },
    ]
}

fn random_result(rng: &mut StdRng, direction: Direction) -> Result<Value, StepError> {
    match rng.gen_range(0..10) {
        0..=4 => Ok(match direction {
            Direction::Forward => json!({ "n": rng.gen_range(0..1000) }),
            Direction::Compensate => Value::Null,
        }),
        5..=6 => Err(StepError::retryable("busy", "try later")),
        7 => Err(StepError::retryable("invalid_request", "malformed")),
        _ => Err(StepError::permanent("declined", "no")),
    }
}

fn random_event(
    rng: &mut StdRng,
    spec: &SagaSpec,
    state: &SagaState,
    now: &mut i64,
    sent: &[Reply],
) -> Event {
    let reply = |step, direction, attempt, result| {
        Event::Reply(Reply {
            step,
            direction,
            attempt,
            result,
            worker: "w".into(),
        })
    };
    let roll = rng.gen_range(0..100);
    if roll < 40 {
        if let Activity::InFlight {
            step,
            direction,
            attempt,
            ..
        } = state.activity
        {
            *now += rng.gen_range(0..50);
            return reply(step, direction, attempt, random_result(rng, direction));
        }
    } else if roll < 50 && !sent.is_empty() {
        *now += rng.gen_range(0..50);
        return Event::Reply(sent[rng.gen_range(0..sent.len())].clone());
    } else if roll < 60 {
        *now += rng.gen_range(0..50);
        let step = rng.gen_range(0..=spec.steps.len());
        let direction = if rng.gen_bool(0.5) {
            Direction::Forward
        } else {
            Direction::Compensate
        };
        let made = state
            .steps
            .get(step)
            .map_or(1, |s| s.attempts(direction).made);
        let attempt = rng.gen_range(0..=made + 1);
        return reply(step, direction, attempt, random_result(rng, direction));
    } else if roll < 72 {
        let actor = "op".to_string();
        let action = match rng.gen_range(0..4) {
            0 => OperatorAction::Resume,
            1 => OperatorAction::RetryNow,
            2 => OperatorAction::Cancel,
            _ => {
                let step = match state.current_step() {
                    Some((current, _)) if rng.gen_bool(0.7) => spec.steps[current].name.clone(),
                    _ if rng.gen_bool(0.2) => "nope".into(),
                    _ => spec.steps[rng.gen_range(0..spec.steps.len())].name.clone(),
                };
                let output = rng.gen_bool(0.7).then(|| json!({ "manual": true }));
                OperatorAction::SkipStep { step, output }
            }
        };
        *now += rng.gen_range(0..50);
        return Event::Operator(OperatorCommand {
            actor,
            reason: "random".into(),
            action,
        });
    } else if roll < 74 {
        return Event::Start;
    }
    // A timer: usually when it is due, sometimes early or late.
    match state.wake_at() {
        Some(wake) if rng.gen_bool(0.75) => {
            *now = (*now).max(wake.0 + rng.gen_range(0..3));
        }
        _ => *now += rng.gen_range(0..1_500),
    }
    Event::TimerFired
}

fn random_walk(spec: &SagaSpec, seed: u64) -> SagaStatus {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut delays = SeededDelays(StdRng::seed_from_u64(seed ^ 0x5eed_5eed_5eed_5eed));
    let mut state = SagaState::new(SAGA_ID, spec, json!({ "seed": seed }), START);
    let mut now = START.0;
    let mut checker = Checker::new(spec, format!("spec {} seed {seed}", spec.name));
    let mut sent = Vec::new();
    let length = rng.gen_range(1..160);
    for i in 0..length {
        let event = if i == 0 {
            Event::Start
        } else {
            random_event(&mut rng, spec, &state, &mut now, &sent)
        };
        if let Event::Reply(reply) = &event {
            sent.push(reply.clone());
        }
        let before = state.clone();
        let result = catch_unwind(AssertUnwindSafe(|| {
            decide(
                &before,
                spec,
                event.clone(),
                Inputs {
                    now: Timestamp(now),
                    delays: &mut delays,
                },
            )
        }))
        .unwrap_or_else(|_| {
            panic!(
                "the machine panicked: spec {} seed {seed} event {i} {event:?} on {before:?}",
                spec.name
            )
        });
        checker.observe(&before, &event, Timestamp(now), &result);
        if let Ok(t) = result {
            state = t.state;
        }
    }
    state.status
}

#[test]
fn random_event_sequences_keep_the_invariants() {
    for spec in random_specs() {
        let mut ends: BTreeMap<&str, usize> = BTreeMap::new();
        for seed in 0..3_000 {
            *ends.entry(random_walk(&spec, seed).as_str()).or_default() += 1;
        }
        // The walks reach every kind of end, so the invariants were checked on each.
        for status in ["completed", "compensated", "stuck"] {
            assert!(
                ends.get(status).copied().unwrap_or(0) > 0,
                "spec {}: no walk ended {status}: {ends:?}",
                spec.name
            );
        }
    }
}
