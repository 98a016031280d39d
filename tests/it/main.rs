//! Guildhall's integration tests: one binary, one module per area.
//! Every test runs against the real RabbitMQ in a namespace of its own.

mod agent;
mod api;
mod bench;
mod browser;
mod cancel;
mod capacity;
mod chaos;
mod cli;
mod cluster;
mod control;
mod delay;
mod demo;
mod demo_worker;
mod errors;
mod flow_graph;
mod flow_results;
mod flows;
mod flows_agent;
mod flows_dag;
mod hostile;
mod hostile_agent;
mod hostile_http;
mod pipeline;
mod priority;
mod priority_submit;
mod probes;
mod prometheus;
mod rabbitmq_definitions;
mod rate_limit;
mod recovery;
mod restart;
mod schedules;
mod scheduling_view;
mod test_command;
mod tls;
