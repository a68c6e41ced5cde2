//! The offline check behind `multihub-association verify`: re-verifies every stored signal
//! against the configured keys and recomputes every linkage and confirmation by replaying the
//! signals in arrival (seq) order, exactly as the writer applied them.

use multihub_protocol::signal::Signal;
use std::collections::HashMap;

use crate::config::Config;
use crate::policy::{digest, OpSignals};
use crate::store::{SignalStore, StoreError};

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    pub signals: u64,
    pub operations: u64,
    pub confirmations: u64,
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Expected {
    linkage: String,
    providers: Vec<String>,
    policy: String,
    signal_seq: i64,
}

#[derive(Default)]
struct OpState {
    signals: OpSignals,
    route: Option<String>,
    expected: Option<Expected>,
}

const PAGE: usize = 4096;
/// Stop listing after this many problems (the count is still reported).
const MAX_LISTED: usize = 1000;

/// Runs the check.
pub fn verify(store: &mut dyn SignalStore, config: &Config) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let mut problem_count = 0u64;
    let mut problem = |report: &mut Report, p: String| {
        problem_count += 1;
        if report.problems.len() < MAX_LISTED {
            report.problems.push(p);
        }
    };
    let mut ops: HashMap<String, OpState> = HashMap::new();
    let mut after = 0;
    loop {
        let page = store.signals_after(after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for row in page {
            report.signals += 1;
            let seq = row.seq;
            let sig = match Signal::parse(&row.bytes) {
                Ok(s) => s,
                Err(e) => {
                    problem(&mut report, format!("signal {seq}: {e}"));
                    continue;
                }
            };
            if sig.operation != row.operation
                || sig.provider != row.provider
                || sig.stage != row.stage
            {
                problem(
                    &mut report,
                    format!("signal {seq}: indexed columns differ from the stored bytes"),
                );
            }
            let d = digest(&row.bytes);
            if row.digest != d {
                problem(&mut report, format!("signal {seq}: stored digest differs"));
            }
            match config.provider_index(&sig.provider) {
                None => problem(
                    &mut report,
                    format!(
                        "signal {seq}: provider \"{}\" is not registered",
                        sig.provider
                    ),
                ),
                Some(i) => match config.providers[i]
                    .keys
                    .iter()
                    .find(|k| k.key_id() == sig.key_id)
                {
                    None => problem(
                        &mut report,
                        format!(
                            "signal {seq}: key {} is not registered for \"{}\"",
                            sig.key_id, sig.provider
                        ),
                    ),
                    Some(k) => {
                        if let Err(e) = sig.verify(k.key()) {
                            problem(&mut report, format!("signal {seq}: {e}"));
                        }
                    }
                },
            }
            let st = ops.entry(row.operation.clone()).or_default();
            if st
                .signals
                .entries
                .iter()
                .any(|(p, s, _)| *p == row.provider && *s == row.stage)
            {
                problem(
                    &mut report,
                    format!(
                        "signal {seq}: a second signal for the same (operation, provider, stage)"
                    ),
                );
                continue;
            }
            match (&st.route, &row.route) {
                (Some(a), Some(b)) if a != b => problem(
                    &mut report,
                    format!("signal {seq}: route \"{b}\" differs from the operation's \"{a}\""),
                ),
                (None, Some(b)) => st.route = Some(b.clone()),
                _ => {}
            }
            st.signals
                .entries
                .push((row.provider.clone(), row.stage, d));
            if st.expected.is_none() {
                let (policy, name) = config.policies.for_route(st.route.as_deref());
                if let Some(providers) = policy.holds(&st.signals) {
                    st.expected = Some(Expected {
                        linkage: st.signals.linkage(),
                        providers,
                        policy: name.to_string(),
                        signal_seq: seq,
                    });
                }
            }
        }
    }
    report.operations = ops.len() as u64;
    let mut after = 0;
    let mut last_signal_seq = 0;
    loop {
        let page = store.confirmations_after(after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for c in page {
            report.confirmations += 1;
            if c.signal_seq <= last_signal_seq {
                problem(
                    &mut report,
                    format!("confirmation {}: out of order with the signals", c.seq),
                );
            }
            last_signal_seq = c.signal_seq;
            let got = Expected {
                linkage: c.linkage.clone(),
                providers: c.providers.clone(),
                policy: c.policy.clone(),
                signal_seq: c.signal_seq,
            };
            match ops.get_mut(&c.operation).and_then(|s| s.expected.take()) {
                None => problem(
                    &mut report,
                    format!(
                        "confirmation {} of {}: the policy never held (or a second confirmation)",
                        c.seq, c.operation
                    ),
                ),
                Some(want) if want != got => problem(
                    &mut report,
                    format!(
                        "confirmation {} of {}: recorded {got:?}, recomputed {want:?}",
                        c.seq, c.operation
                    ),
                ),
                Some(_) => {}
            }
        }
    }
    for (op, st) in &ops {
        if st.expected.is_some() {
            problem(
                &mut report,
                format!("operation {op}: the policy holds but no confirmation is recorded"),
            );
        }
    }
    if problem_count as usize > report.problems.len() {
        let more = problem_count as usize - report.problems.len();
        report.problems.push(format!("... and {more} more"));
    }
    Ok(report)
}
