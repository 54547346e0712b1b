//! What a plan is: each MAR step's tokens, diffusion steps, FTS rule,
//! guidance and temperature, as the planner ([`super::Planner`]) writes
//! them; immutable once made, serialized into run records and `plan --json`.

use serde::{Deserialize, Serialize};

use crate::grid::Grid;
use crate::schedule::ast::Selector;

/// The most diffusion steps a token may get (the training chain has 1000).
pub const MAX_DIFFUSION_STEPS: u32 = 1000;

/// A stage as planned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanStage {
    pub name: String,
    /// Number of tokens the stage reveals.
    pub tokens: usize,
    /// Number of MAR steps it takes.
    pub steps: usize,
}

/// FTS for one step: the top `count` of the step's tokens by `selector`
/// get `steps` diffusion steps instead of the step's base count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DetailRule {
    /// β as written.
    pub fraction: f64,
    pub steps: u32,
    pub selector: Selector,
    /// `clamp(round_half_even(β · tokens), 1, tokens)`.
    pub count: usize,
}

/// One MAR step: one backbone pass, then diffusion for `tokens`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanStep {
    /// Index into [`Plan::stages`].
    pub stage: usize,
    /// Tokens revealed, row-major indices, ascending. For an adaptive step
    /// a provisional choice (the right count, from the stage's tokens, in
    /// a seeded random order): the engine picks the real ones.
    pub tokens: Vec<usize>,
    /// `Some` for a step of an `order adaptive by SELECTOR` stage: the
    /// engine reveals the `tokens.len()` still-masked tokens of the stage
    /// ranked first by `SELECTOR` on their FTS scores at this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<Selector>,
    /// Tokens known before this step.
    pub known_before: usize,
    /// Diffusion steps for each token (before FTS).
    pub diffusion_steps: u32,
    pub detail: Option<DetailRule>,
    /// Classifier-free guidance scale for this step; `None` runs no
    /// unconditional pass at all.
    pub cfg: Option<f64>,
    /// Scale of the diffusion sampler's per-step noise.
    pub temperature: f64,
    /// `clip_timesteps`: the largest training-chain timestep this step's
    /// chains keep ([`super::respaced_timesteps`]); `None` keeps them all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_timesteps: Option<u32>,
}

impl PlanStep {
    /// Iterations of this step's chain of `steps` diffusion steps on a
    /// model trained with `train_steps`: `steps`, or fewer where
    /// `clip_timesteps` merges timesteps.
    pub fn chain_len(&self, steps: u32, train_steps: usize) -> usize {
        match self.clip_timesteps {
            None => steps as usize,
            Some(_) => {
                super::respaced_timesteps(train_steps, steps as usize, self.clip_timesteps).len()
            }
        }
    }

    /// Diffusion-head evaluations this step needs per CFG branch on a
    /// model trained with `train_steps`: Σ over tokens of their chains'
    /// iterations.
    pub fn diffusion_rows(&self, train_steps: usize) -> u64 {
        let n = self.tokens.len() as u64;
        let base = self.chain_len(self.diffusion_steps, train_steps) as u64;
        match self.detail {
            Some(d) => {
                (n - d.count as u64) * base
                    + d.count as u64 * self.chain_len(d.steps, train_steps) as u64
            }
            None => n * base,
        }
    }

    /// The most diffusion steps a token of the step is given (what bounds
    /// its latency; its chain may have fewer iterations, see
    /// [`PlanStep::chain_len`]).
    pub fn max_diffusion_steps(&self) -> u32 {
        self.detail
            .map_or(self.diffusion_steps, |d| d.steps.max(self.diffusion_steps))
    }
}

/// An executable schedule for one grid and one seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub grid: Grid,
    pub seed: u64,
    pub stages: Vec<PlanStage>,
    pub steps: Vec<PlanStep>,
}

impl Plan {
    /// The most diffusion iterations any token of the plan runs on a model
    /// trained with `train_steps` (0 for a plan without steps), clipped
    /// chains counted as they run: what a replay's `step_noise` must cover.
    pub fn longest_chain(&self, train_steps: usize) -> usize {
        // A chain's length never falls as its steps grow: the longest is
        // the one of the most steps.
        self.steps
            .iter()
            .map(|s| s.chain_len(s.max_diffusion_steps(), train_steps))
            .max()
            .unwrap_or(0)
    }

    /// Whether any step's tokens are chosen at run time.
    pub fn is_adaptive(&self) -> bool {
        self.steps.iter().any(|s| s.adaptive.is_some())
    }

    /// The tokens of stage `stage` in the order its steps' provisional
    /// tokens list them (step by step, ascending within a step).
    pub fn stage_sequence(&self, stage: usize) -> Vec<usize> {
        self.steps
            .iter()
            .filter(|s| s.stage == stage)
            .flat_map(|s| s.tokens.iter().copied())
            .collect()
    }

    /// For each token, the 0-based step that reveals it.
    pub fn reveal_step(&self) -> Vec<usize> {
        let mut out = vec![usize::MAX; self.grid.len()];
        for (s, step) in self.steps.iter().enumerate() {
            for &t in &step.tokens {
                out[t] = s;
            }
        }
        out
    }

    /// For each token, the stage that reveals it.
    pub fn stage_of_token(&self) -> Vec<usize> {
        let mut out = vec![usize::MAX; self.grid.len()];
        for step in &self.steps {
            for &t in &step.tokens {
                out[t] = step.stage;
            }
        }
        out
    }

    /// Checks the invariants every plan must satisfy: each token revealed
    /// exactly once, at least one token per step, `known_before` consistent.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![false; self.grid.len()];
        let mut known = 0;
        for (s, step) in self.steps.iter().enumerate() {
            if step.tokens.is_empty() {
                return Err(format!("step {s} reveals no token"));
            }
            if step.known_before != known {
                return Err(format!(
                    "step {s}: known_before {} != {known}",
                    step.known_before
                ));
            }
            for &t in &step.tokens {
                if t >= seen.len() {
                    return Err(format!("step {s} reveals token {t}, outside the grid"));
                }
                if std::mem::replace(&mut seen[t], true) {
                    return Err(format!("token {t} is revealed twice (again at step {s})"));
                }
            }
            known += step.tokens.len();
        }
        match seen.iter().position(|&x| !x) {
            Some(t) => Err(format!("token {t} is never revealed")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::grid::Grid;
    use crate::plan::plan;
    use crate::schedule::{Schedule, Source};

    /// A plan of the 2x2 grid in two steps of two tokens.
    fn two_steps() -> super::Plan {
        let text = "grid 2x2\nstage a { tokens all order raster steps 2 }";
        let schedule =
            Schedule::from_source(Source::new("p.gtr", text), &Default::default()).unwrap();
        plan(&schedule, Grid::new(2, 2), 0).unwrap()
    }

    /// Each way a plan can break its invariants is named.
    #[test]
    fn broken_plans_are_named() {
        let good = two_steps();
        assert_eq!(good.check_invariants(), Ok(()));
        assert_eq!(good.steps[0].tokens, [0, 1]);
        let broken = |edit: &dyn Fn(&mut super::Plan)| {
            let mut p = good.clone();
            edit(&mut p);
            p.check_invariants().unwrap_err()
        };
        assert_eq!(
            broken(&|p| p.steps[1].tokens.clear()),
            "step 1 reveals no token"
        );
        assert_eq!(
            broken(&|p| p.steps[1].known_before = 1),
            "step 1: known_before 1 != 2"
        );
        assert_eq!(
            broken(&|p| p.steps[1].tokens[0] = 4),
            "step 1 reveals token 4, outside the grid"
        );
        assert_eq!(
            broken(&|p| p.steps[1].tokens[0] = 1),
            "token 1 is revealed twice (again at step 1)"
        );
        assert_eq!(
            broken(&|p| {
                p.steps[1].tokens.pop();
            }),
            "token 3 is never revealed"
        );
    }
}
