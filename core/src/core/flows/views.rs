//! What the API shows of flows: a task's place in its flow
//! (`GET /api/tasks/{id}`'s `flow`), a whole flow as a graph
//! (`GET /api/flows/{id}`), and the ETA of a task that waits for others
//! (the slowest path through what it waits for, then its own stages).

use super::{Decision, Slot};
use crate::core::Core;
use crate::core::eta::{self, Eta, QueueIndex, StageTiming};
use crate::core::query::display_status;
use guildhall_proto::flow::split_child_id;
use guildhall_proto::{Stage, TaskId};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::Not;

/// Most nodes a flow view lists (the counts cover every node).
pub const MAX_FLOW_NODES: usize = 2_000;

/// Most dependents listed on a task's page.
const MAX_DEPENDENTS_LISTED: usize = 100;

/// A dependency of a held task, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DependencyView {
    /// The task waited for.
    pub id: String,
    /// Its status (`unknown` if never heard of).
    pub status: &'static str,
    /// Whether the held task still waits for it.
    pub waiting: bool,
}

/// A fan-out's children, as the API shows them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChildrenView {
    /// How many (0 while only children's reports are known).
    pub total: u32,
    /// Children that ended, by how (`succeeded`, `dead_lettered`, `cancelled`).
    pub ended: BTreeMap<&'static str, u32>,
    /// Where the parent continues (`None`: it finishes with them).
    pub join: Option<String>,
    /// `fail` or `continue`.
    pub on_child_failure: &'static str,
    /// `waiting`, `released`, `dead_lettered` or `finished`.
    pub state: &'static str,
    /// When the parent fanned out.
    pub fanned_out_at_ms: u64,
}

/// A task's place in its flow, in `GET /api/tasks/{id}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskFlowView {
    /// The flow's root (the top parent): `GET /api/flows/{root}`.
    pub root: String,
    /// Its parent, if it is a child.
    pub parent: Option<String>,
    /// Its index among its parent's children.
    pub index: Option<u32>,
    /// Its children, if it fanned out.
    pub children: Option<ChildrenView>,
    /// What it runs after, if it was held for dependencies.
    pub after: Vec<DependencyView>,
    /// `fail` or `run`, if it has dependencies.
    pub on_dependency_failure: Option<&'static str>,
    /// What it waits for now, in words (`dependency CODE-1`,
    /// `3 of 5 children`); empty when it waits for nothing.
    pub waiting_for: Vec<String>,
    /// Held tasks that wait for it (the first 100).
    pub dependents: Vec<String>,
    /// Why the coordinator dead-lettered it, if it did.
    pub failed_because: Option<String>,
}

/// A node of a flow's graph.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlowNode {
    /// The task.
    pub id: String,
    /// Its status (`unknown` for a dependency never heard of).
    pub status: &'static str,
    /// Its current (or last, or held-for) stage.
    pub stage: Option<String>,
    /// Its parent in the flow, if it is a child.
    pub parent: Option<String>,
    /// Estimated time left (the slowest path through what it waits for).
    pub eta_in_ms: Option<u64>,
    /// Optimistic end of the estimate.
    pub eta_low_in_ms: Option<u64>,
    /// Pessimistic end.
    pub eta_high_in_ms: Option<u64>,
}

/// An edge of a flow's graph.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlowEdge {
    /// Where it starts: the parent, or the dependency.
    pub from: String,
    /// Where it ends: the child, or the dependent.
    pub to: String,
    /// `child` (fan-out) or `after` (dependency).
    pub kind: &'static str,
}

/// `GET /api/flows/{id}`: the flow `id` belongs to, from its root.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlowView {
    /// The task asked about.
    pub id: String,
    /// The flow's root.
    pub root: String,
    /// Its tasks (the first [`MAX_FLOW_NODES`], parents before children).
    pub nodes: Vec<FlowNode>,
    /// Fan-out and dependency edges between listed nodes.
    pub edges: Vec<FlowEdge>,
    /// Every task of the flow by status, listed or not.
    pub counts: BTreeMap<&'static str, u64>,
    /// Tasks in the flow, listed or not.
    pub total: u64,
    /// Whether nodes were left out past [`MAX_FLOW_NODES`].
    pub truncated: bool,
    /// The root's ETA (all of the flow), if known.
    pub eta_in_ms: Option<u64>,
    /// Its optimistic end.
    pub eta_low_in_ms: Option<u64>,
    /// Its pessimistic end.
    pub eta_high_in_ms: Option<u64>,
}

/// What ETAs of a flow are computed from, built once per view.
/// A fan-out child's result as its parent's join holds it (issue 19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildResult {
    /// The bytes, while they are carried inline and the join has not
    /// handed them on yet.
    pub inline: Option<std::sync::Arc<[u8]>>,
    /// Its size.
    pub bytes: u64,
    /// The SHA-256 of a result stored in the results stream.
    pub sha256: Option<[u8; 32]>,
}

pub(crate) struct EtaInputs {
    timings: BTreeMap<Stage, StageTiming>,
    queues: QueueIndex,
}

impl Core {
    pub(crate) fn eta_inputs(&self, now_ms: u64) -> EtaInputs {
        EtaInputs {
            timings: self.stage_timings(now_ms),
            queues: QueueIndex::build(self.tasks.iter(), now_ms),
        }
    }

    /// The status of `id` as the API shows it.
    fn flow_status(&self, id: &str, now_ms: u64) -> &'static str {
        match self.tasks.get_ref(id) {
            Some(t) => display_status(t, now_ms).as_str(),
            None => "unknown",
        }
    }

    /// Whether `id` is in a flow: held for dependencies, fanned out, or a
    /// fan-out's child (cheap: for every line of a task list).
    pub fn in_flow(&self, id: &TaskId) -> bool {
        self.flows.is_empty().not()
            && (self.flows.held.contains_key(id)
                || self.flows.joins.contains_key(id)
                || self.parent_of(id).is_some())
    }

    /// What this coordinator knows of a fan-out child's result, while its
    /// parent's join is remembered: `None` if the child is unknown, has
    /// not succeeded, or its join was forgotten.
    pub fn child_result(&self, child: &TaskId) -> Option<ChildResult> {
        let (parent, index) = split_child_id(child.as_str())?;
        let j = self.flows.joins.get(parent)?;
        match j.slots.get(&index)? {
            Slot::Succeeded {
                result,
                bytes,
                stored,
            } => Some(ChildResult {
                inline: result.clone(),
                bytes: *bytes,
                sha256: *stored,
            }),
            Slot::Failed { .. } => None,
        }
    }

    /// The flow's root above `id`: its top parent, or for a held task
    /// its first dependency's root (or `id`).
    pub fn flow_root(&self, id: &TaskId) -> TaskId {
        let mut at = id.clone();
        for _ in 0..super::MAX_DEPTH {
            let up = self.parent_of(&at).or_else(|| {
                self.flows
                    .held
                    .get(&at)
                    .and_then(|h| h.after.first().cloned())
            });
            match up {
                Some(p) if p != *id => at = p,
                _ => break,
            }
        }
        at
    }

    /// `id`'s place in its flow; `None` if it is in none.
    pub fn task_flow_view(&self, id: &TaskId, now_ms: u64) -> Option<TaskFlowView> {
        let held = self.flows.held.get(id);
        let join = self.flows.joins.get(id);
        let parent = self.parent_of(id);
        let dependents = self.flows.dependents_of(id, MAX_DEPENDENTS_LISTED);
        if held.is_none() && join.is_none() && parent.is_none() && dependents.is_empty() {
            return None;
        }
        let mut waiting_for = Vec::new();
        let after = held.map_or_else(Vec::new, |h| {
            h.after
                .iter()
                .map(|d| {
                    let waiting = h.pending.contains(d);
                    if waiting && h.decision.is_none() && !h.released {
                        waiting_for.push(format!("dependency {d}"));
                    }
                    DependencyView {
                        id: d.to_string(),
                        status: self.flow_status(d.as_str(), now_ms),
                        waiting,
                    }
                })
                .collect()
        });
        let children = join.map(|j| {
            let mut ended: BTreeMap<&'static str, u32> = BTreeMap::new();
            for s in j.slots.values() {
                let k = match s {
                    Slot::Succeeded { .. } => "succeeded",
                    Slot::Failed { status, .. } => status.as_str(),
                };
                *ended.entry(k).or_default() += 1;
            }
            if j.is_open() {
                waiting_for.push(if j.children == 0 {
                    "its fan-out's report".to_owned()
                } else {
                    format!(
                        "{} of {} children",
                        j.children as usize - j.slots.len(),
                        j.children
                    )
                });
            }
            ChildrenView {
                total: j.children,
                ended,
                join: j.join.as_ref().map(ToString::to_string),
                on_child_failure: j.policy.as_str(),
                state: match (&j.decision, j.released) {
                    (None, _) => "waiting",
                    (Some(Decision::DeadLetter(_)), _) => "dead_lettered",
                    (Some(Decision::Done), _) => "finished",
                    (Some(Decision::Release), true) => "released",
                    (Some(Decision::Release), false) => "releasing",
                },
                fanned_out_at_ms: j.fanned_at_ms,
            }
        });
        let failed_because = held
            .and_then(|h| match &h.decision {
                Some(Decision::DeadLetter(why)) => Some(why.clone()),
                _ => None,
            })
            .or_else(|| {
                join.and_then(|j| match &j.decision {
                    Some(Decision::DeadLetter(why)) => Some(why.clone()),
                    _ => None,
                })
            });
        Some(TaskFlowView {
            root: self.flow_root(id).to_string(),
            index: parent
                .as_ref()
                .and_then(|_| split_child_id(id.as_str()).map(|(_, i)| i)),
            parent: parent.map(|p| p.to_string()),
            children,
            after,
            on_dependency_failure: held.map(|h| h.policy.as_str()),
            waiting_for,
            dependents: dependents.iter().map(ToString::to_string).collect(),
            failed_because,
        })
    }

    /// The ETA of `id` through its flow: a held task finishes after the
    /// slowest of its dependencies, then its own stages; a waiting parent
    /// after the slowest of its children, then its join stage's path.
    pub(crate) fn flow_eta(&self, id: &TaskId, inputs: &EtaInputs, now_ms: u64) -> Option<Eta> {
        self.flow_eta_at(id, inputs, now_ms, 0)
    }

    fn flow_eta_at(
        &self,
        id: &TaskId,
        inputs: &EtaInputs,
        now_ms: u64,
        depth: usize,
    ) -> Option<Eta> {
        if depth > 16 {
            return None;
        }
        let zero = Eta {
            in_ms: 0,
            low_in_ms: 0,
            high_in_ms: 0,
        };
        let slowest = |ids: &mut dyn Iterator<Item = TaskId>| -> Option<Eta> {
            let mut acc = zero;
            for d in ids {
                let e = self.flow_eta_at(&d, inputs, now_ms, depth + 1)?;
                acc = Eta {
                    in_ms: acc.in_ms.max(e.in_ms),
                    low_in_ms: acc.low_in_ms.max(e.low_in_ms),
                    high_in_ms: acc.high_in_ms.max(e.high_in_ms),
                };
            }
            Some(acc)
        };
        let plus = |a: Eta, b: Eta| Eta {
            in_ms: a.in_ms + b.in_ms,
            low_in_ms: a.low_in_ms + b.low_in_ms,
            high_in_ms: a.high_in_ms + b.high_in_ms,
        };
        if let Some(h) = self.flows.held.get(id)
            && h.decision.is_none()
            && !h.released
        {
            let deps = slowest(&mut h.pending.iter().cloned())?;
            return Some(plus(deps, eta::path_from(&h.stage, &inputs.timings)?));
        }
        if let Some(j) = self.flows.joins.get(id)
            && j.is_open()
            && j.children > 0
        {
            let open = (0..j.children)
                .filter(|i| !j.slots.contains_key(i))
                .filter_map(|i| TaskId::new(format!("{id}:{i}")).ok());
            let kids = slowest(&mut open.take(MAX_FLOW_NODES))?;
            return Some(match &j.join {
                Some(stage) => plus(kids, eta::path_from(stage, &inputs.timings)?),
                None => kids,
            });
        }
        let t = self.tasks.get_ref(id.as_str())?;
        if t.status().is_terminal() {
            return Some(zero);
        }
        eta::eta(t, &inputs.timings, &inputs.queues, now_ms)
    }

    /// `GET /api/flows/{id}`: the flow `id` belongs to, from its root;
    /// `None` if `id` is unknown.
    pub fn flow_view(&self, id: &TaskId, now_ms: u64) -> Option<FlowView> {
        if !self.is_known(id) {
            return None;
        }
        let root = self.flow_root(id);
        let inputs = self.eta_inputs(now_ms);
        let mut nodes = Vec::new();
        let mut edges = Vec::new();
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut total = 0u64;
        let mut seen: HashSet<TaskId> = HashSet::new();
        let mut queue: VecDeque<(TaskId, Option<TaskId>)> = VecDeque::new();
        let dependents = self.flows.dependency_index();
        // Dependencies of the root come first (they run before it).
        if let Some(h) = self.flows.held.get(&root) {
            for d in &h.after {
                queue.push_back((d.clone(), None));
                edges.push(FlowEdge {
                    from: d.to_string(),
                    to: root.to_string(),
                    kind: "after",
                });
            }
        }
        queue.push_back((root.clone(), None));
        while let Some((at, parent)) = queue.pop_front() {
            if !seen.insert(at.clone()) {
                continue;
            }
            total += 1;
            let status = self.flow_status(at.as_str(), now_ms);
            *counts.entry(status).or_default() += 1;
            let listed = nodes.len() < MAX_FLOW_NODES;
            if listed {
                let eta = self.flow_eta(&at, &inputs, now_ms);
                let stage = self
                    .tasks
                    .get_ref(at.as_str())
                    .map(|t| t.stage().to_string())
                    .or_else(|| self.flows.held.get(&at).map(|h| h.stage.to_string()));
                nodes.push(FlowNode {
                    id: at.to_string(),
                    status,
                    stage,
                    parent: parent.as_ref().map(ToString::to_string),
                    eta_in_ms: eta.map(|e| e.in_ms),
                    eta_low_in_ms: eta.map(|e| e.low_in_ms),
                    eta_high_in_ms: eta.map(|e| e.high_in_ms),
                });
            }
            if let Some(j) = self.flows.joins.get(&at) {
                for i in 0..j.children {
                    let Ok(child) = TaskId::new(format!("{at}:{i}")) else {
                        continue;
                    };
                    if listed && nodes.len() + queue.len() < MAX_FLOW_NODES {
                        edges.push(FlowEdge {
                            from: at.to_string(),
                            to: child.to_string(),
                            kind: "child",
                        });
                    }
                    queue.push_back((child, Some(at.clone())));
                }
            }
            for dep in dependents.get(&at).map_or(&[][..], Vec::as_slice) {
                if listed {
                    edges.push(FlowEdge {
                        from: at.to_string(),
                        to: dep.to_string(),
                        kind: "after",
                    });
                }
                queue.push_back((dep.clone(), None));
            }
            if total > 1_000_000 {
                break;
            }
        }
        let listed: HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        edges.retain(|e| listed.contains(e.from.as_str()) && listed.contains(e.to.as_str()));
        let eta = self.flow_eta(&root, &inputs, now_ms);
        Some(FlowView {
            id: id.to_string(),
            root: root.to_string(),
            truncated: (nodes.len() as u64) < total,
            nodes,
            edges,
            counts,
            total,
            eta_in_ms: eta.map(|e| e.in_ms),
            eta_low_in_ms: eta.map(|e| e.low_in_ms),
            eta_high_in_ms: eta.map(|e| e.high_in_ms),
        })
    }
}
