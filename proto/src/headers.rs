//! Header names: on task messages (AMQP), on the hand-off to an HTTP worker,
//! and the environment of an exec worker. One place, so agent, coordinator
//! and users' workers agree.

/// AMQP headers on task messages. The task id itself is the `message_id`
/// property; the enqueue time is also mirrored in the `timestamp` property
/// (seconds) for tools that only read that.
pub mod amqp {
    /// Attempt number at the current stage, 1 for the first try (long int).
    pub const ATTEMPT: &str = "x-guildhall-attempt";
    /// When the message was put on its current stage's queue, ms since epoch.
    pub const ENQUEUED_AT: &str = "x-guildhall-enqueued-at";
    /// When the task entered the pipeline, ms since epoch; kept across stages.
    pub const SUBMITTED_AT: &str = "x-guildhall-submitted-at";
    /// W3C trace context, kept across stages (new parent span per stage).
    pub const TRACEPARENT: &str = "traceparent";
    /// The stage a dead-lettered task failed at.
    pub const DEAD_STAGE: &str = "x-guildhall-dead-stage";
    /// The last error of a dead-lettered task.
    pub const LAST_ERROR: &str = "x-guildhall-last-error";
    /// The error class of a dead-lettered task's last failure.
    pub const ERROR_CLASS: &str = "x-guildhall-error-class";
    /// The agent that dead-lettered a task.
    pub const DEAD_BY: &str = "x-guildhall-dead-by";
    /// Set by quorum queues: how many times the broker delivered the message.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
    /// Set by streams on each delivery: the message's offset.
    pub const STREAM_OFFSET: &str = "x-stream-offset";
    /// From a producer: hold the task this many milliseconds before it runs
    /// (the header of RabbitMQ's delayed-message plugin; integer or decimal
    /// text). The priority is the standard `priority` property, not a header.
    pub const DELAY: &str = "x-delay";
    /// When a delayed task becomes due, ms since epoch; set on messages in
    /// the delay ladder.
    pub const DUE_AT: &str = "x-guildhall-due-at";
    /// On a task fired by a cron schedule: the schedule's name.
    pub const SCHEDULE: &str = "x-guildhall-schedule";
    /// From a producer: hold the task until these tasks have finished
    /// (task ids separated by commas). The agent sorting the stage's intake
    /// hands it to the coordinator (`TaskHeld`), which publishes it then.
    pub const AFTER: &str = "x-guildhall-after";
    /// With [`AFTER`]: `fail` (the default: a dead-lettered or cancelled
    /// dependency dead-letters this task too) or `run` (run anyway).
    pub const ON_DEPENDENCY_FAILURE: &str = "x-guildhall-on-dependency-failure";
    /// On a child task (and its messages at every later stage): its
    /// parent's id. Its last stage reports its result for the parent's join.
    pub const PARENT: &str = "x-guildhall-parent";
    /// On a parent published to its join stage: it has fanned out once and
    /// may not again (its children's ids would repeat).
    pub const JOINED: &str = "x-guildhall-joined";
}

/// HTTP headers between an agent and an HTTP worker.
pub mod http {
    /// Request: the task id.
    pub const TASK_ID: &str = "x-guildhall-task-id";
    /// Request: the stage being processed.
    pub const STAGE: &str = "x-guildhall-stage";
    /// Request: the attempt number at this stage.
    pub const ATTEMPT: &str = "x-guildhall-attempt";
    /// Request: `<task id>/<stage>/<attempt>`, stable across redeliveries of
    /// the same attempt; workers use it to make side effects idempotent.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// Request: W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// Response: send the result to this stage instead of the default next
    /// one; the value `-` ends the pipeline here.
    pub const NEXT_STAGE: &str = "x-guildhall-next-stage";
    /// Response (on failure): the worker's own error class, such as `db_timeout`.
    pub const ERROR_CLASS: &str = "x-guildhall-error-class";
    /// Request: the task's priority, 0-9. Response: the priority the result
    /// gets at the next stage (the task's own is kept without it).
    pub const PRIORITY: &str = "x-guildhall-priority";
    /// Request: on a child task, its parent's id.
    pub const PARENT: &str = "x-guildhall-parent";
    /// Response: `ndjson`: the body (`Content-Type: application/x-ndjson`)
    /// is one child task per line, not a result (see [`super::FAN_OUT_LINE`]).
    pub const FAN_OUT: &str = "x-guildhall-fan-out";
    /// Response (with [`FAN_OUT`]): the stage where the parent continues
    /// once every child has finished, with their results; `-` for none.
    /// Without it, the agent's `--join` (or none).
    pub const JOIN: &str = "x-guildhall-join";
    /// Response (with [`FAN_OUT`]): `fail` (the default) or `continue`.
    pub const ON_CHILD_FAILURE: &str = "x-guildhall-on-child-failure";
}

/// The value of [`http::FAN_OUT`], and the content type its body has.
pub const FAN_OUT_NDJSON: &str = "ndjson";

/// The content type of a fan-out body, and of nothing else.
pub const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

/// An exec worker fans out by printing this as the first line of its
/// stdout, optionally followed by ` join=STAGE` and
/// ` on-child-failure=fail|continue`; each later line is a child, as in an
/// HTTP worker's ndjson body: a JSON object with `payload` (any JSON value;
/// a string is taken as the payload's text, anything else as its JSON) or
/// `payload_base64`, and optionally `stage`.
pub const FAN_OUT_LINE: &str = "#guildhall-fan-out";

/// Environment of an exec worker process (one per task).
pub mod env {
    /// The task id.
    pub const TASK_ID: &str = "GUILDHALL_TASK_ID";
    /// The stage.
    pub const STAGE: &str = "GUILDHALL_STAGE";
    /// The attempt number at this stage.
    pub const ATTEMPT: &str = "GUILDHALL_ATTEMPT";
    /// `<task id>/<stage>/<attempt>`.
    pub const IDEMPOTENCY_KEY: &str = "GUILDHALL_IDEMPOTENCY_KEY";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "TRACEPARENT";
    /// The task's priority, 0-9.
    pub const PRIORITY: &str = "GUILDHALL_PRIORITY";
    /// On a child task, its parent's id.
    pub const PARENT: &str = "GUILDHALL_PARENT";
}

/// The value of [`http::NEXT_STAGE`] that ends the pipeline.
pub const END_OF_PIPELINE: &str = "-";

/// Exit code of an exec worker meaning "this input is bad, do not retry"
/// (`EX_DATAERR` from sysexits.h). Any other non-zero exit is retried.
pub const EXIT_PERMANENT_FAILURE: i32 = 65;

/// The idempotency key for one stage attempt.
pub fn idempotency_key(task_id: &str, stage: &str, attempt: u32) -> String {
    format!("{task_id}/{stage}/{attempt}")
}
