//! Guildhall's integration tests: one binary, one module per area.
//! Every test runs against the real RabbitMQ in a namespace of its own.

mod agent;
mod api;
mod bench;
mod browser;
mod capacity;
mod chaos;
mod cli;
mod control;
mod demo;
mod demo_worker;
mod errors;
mod hostile;
mod hostile_agent;
mod hostile_http;
mod pipeline;
mod probes;
mod prometheus;
mod rabbitmq_definitions;
mod rate_limit;
mod recovery;
mod restart;
mod test_command;
mod tls;
