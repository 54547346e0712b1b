//! A stage's `order` clause resolved on one grid: keys evaluated and
//! explicit sequences checked here, so that planning a seed cannot fail.

use std::collections::HashMap;
use std::sync::Arc;

use super::order::{self, KeyOrder, ListedOrder, NamedRules, NotAPermutation, TokenOrder};
use super::{PlanEnv, per_token};
use crate::grid::Grid;
use crate::schedule::ast::Expr;
use crate::schedule::expr;
use crate::schedule::fmt_num;
use crate::schedule::{Diagnostic, Order, OrderKind, Source, Span, Stage};

/// The rule ordering `stage`'s `tokens` (ascending) on `grid` (the grid
/// of `named`). An `order by` key is evaluated at the stage's tokens only,
/// so that all stages together evaluate it at most once per cell.
pub(super) fn resolve(
    src: &Arc<Source>,
    stage: &Stage,
    tokens: &[usize],
    grid: Grid,
    params: &HashMap<String, f64>,
    named: &NamedRules,
) -> Result<Box<dyn TokenOrder>, Diagnostic> {
    match &stage.order {
        Order::Named(kind) => Ok(named.rule(*kind)),
        // The provisional order of an adaptive stage: the engine replaces it.
        Order::Adaptive(_) => Ok(named.rule(OrderKind::Random)),
        Order::By { key, ties } => {
            let keyed = per_token(
                tokens.iter().copied(),
                grid,
                params,
                &HashMap::new(),
                &[],
                |env| (env.token(), expr::number(key, env)),
            );
            if let Some(&(t, k)) = keyed.iter().find(|(_, k)| !k.is_finite()) {
                let (i, j) = grid.cell(t);
                return Err(Diagnostic::new(
                    src,
                    key.span,
                    format!(
                        "the order key is {} at row {i}, column {j}; it must be a finite number",
                        fmt_num(k)
                    ),
                )
                .with_help("check for a division by zero or the `sqrt` of a negative number"));
            }
            Ok(Box::new(KeyOrder::new(keyed, *ties)))
        }
        Order::List(list) => {
            let env = PlanEnv::numbers(params, grid);
            let mut listed = Vec::with_capacity(list.len());
            for e in list {
                let v = expr::number(e, &env);
                if !(v.fract() == 0.0 && v >= 0.0 && v < grid.len() as f64) {
                    return Err(Diagnostic::new(
                        src,
                        e.span,
                        format!("{} is not a token of the {grid} grid", fmt_num(v)),
                    )
                    .with_help(format!(
                        "a token is written as its index i·w + j, a whole number from 0 to {}",
                        grid.len() - 1
                    )));
                }
                listed.push(v as usize);
            }
            listed_order(src, stage, &listed, tokens, grid, &Listing::Inline(list))
        }
        Order::File {
            path,
            tokens: entries,
        } => {
            let listed: Vec<usize> = entries.iter().map(|&(t, _)| t).collect();
            let listing = Listing::File {
                path,
                entries,
                span: stage.order_span,
            };
            listed_order(src, stage, &listed, tokens, grid, &listing)
        }
    }
}

/// Where an explicit sequence was written, for errors.
enum Listing<'a> {
    Inline(&'a [Expr]),
    File {
        path: &'a str,
        /// (token, line) per entry.
        entries: &'a [(usize, usize)],
        span: Span,
    },
}

impl Listing<'_> {
    /// Where entry `k` is: its span, a prefix for messages, and how to
    /// name it in a "listed twice" message.
    fn entry(&self, k: usize) -> (Span, String, String) {
        match self {
            Listing::Inline(list) => (list[k].span, String::new(), format!("entry {}", k + 1)),
            Listing::File {
                path,
                entries,
                span,
            } => {
                let line = entries[k].1;
                (
                    *span,
                    format!("order file `{path}`, line {line}: "),
                    format!("on line {line}"),
                )
            }
        }
    }

    fn subject(&self) -> String {
        match self {
            Listing::Inline(_) => "the list".into(),
            Listing::File { path, .. } => format!("order file `{path}`"),
        }
    }
}

/// `listed` as the stage's order, if it is a permutation of its tokens.
fn listed_order(
    src: &Arc<Source>,
    stage: &Stage,
    listed: &[usize],
    tokens: &[usize],
    grid: Grid,
    listing: &Listing,
) -> Result<Box<dyn TokenOrder>, Diagnostic> {
    let cell = |t: usize| {
        let (i, j) = grid.cell(t);
        format!("token {t} (row {i}, column {j})")
    };
    let problem = match order::permutation(listed, tokens, grid) {
        Ok(sequence) => return Ok(Box::new(ListedOrder(sequence))),
        Err(p) => p,
    };
    let (span, message) = match problem {
        NotAPermutation::Foreign { entry } => {
            let (span, prefix, _) = listing.entry(entry);
            let t = listed[entry];
            let what = if t < grid.len() {
                format!(
                    "{} is not one of stage `{}`'s {} tokens",
                    cell(t),
                    stage.name,
                    tokens.len()
                )
            } else {
                format!(
                    "token {t} is outside the {grid} grid (its tokens are 0 to {})",
                    grid.len() - 1
                )
            };
            (span, format!("{prefix}{what}"))
        }
        NotAPermutation::Repeated { entry, first } => {
            let (span, prefix, _) = listing.entry(entry);
            let (_, _, also) = listing.entry(first);
            let t = cell(listed[entry]);
            (span, format!("{prefix}{t} is listed twice (also {also})"))
        }
        NotAPermutation::Missing { count, token } => (
            stage.order_span,
            format!(
                "{} misses {count} of stage `{}`'s {} tokens (e.g. token {token}: row {}, column {})",
                listing.subject(),
                stage.name,
                tokens.len(),
                grid.cell(token).0,
                grid.cell(token).1,
            ),
        ),
    };
    Err(Diagnostic::new(src, span, message).with_help(
        "an explicit order lists each of the stage's tokens exactly once, as its index i·w + j",
    ))
}
