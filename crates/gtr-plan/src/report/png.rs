//! A picture of a plan's order, in the spirit of the GtR paper's Figure 4.
//!
//! Left: every token coloured by the step that reveals it (dark blue first,
//! yellow last). Right, when there are several stages: one panel per stage, showing that stage's tokens in
//! the same colours, tokens known before the stage in grey, and tokens still
//! to come in white, so each stage's boundary is visible. A token of an
//! adaptive stage, whose step is chosen at run time, is striped in the
//! colours of its stage's first and last step.

use image::{Rgb, RgbImage};

use crate::plan::Plan;

const GAP: u32 = 12;
const KNOWN: Rgb<u8> = Rgb([150, 150, 150]);
const LATER: Rgb<u8> = Rgb([255, 255, 255]);
const BACKGROUND: Rgb<u8> = Rgb([235, 235, 235]);

/// Viridis-like colour for `x` in [0, 1].
fn colour(x: f64) -> Rgb<u8> {
    const STOPS: [[f64; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let x = x.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let k = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - k as f64;
    let c = |ch: usize| (STOPS[k][ch] * (1.0 - f) + STOPS[k + 1][ch] * f).round() as u8;
    Rgb([c(0), c(1), c(2)])
}

/// Renders the plan; cells are square, sized so a 16×16 grid is 256 px.
pub fn render(plan: &Plan) -> RgbImage {
    let (h, w) = (plan.grid.height as u32, plan.grid.width as u32);
    let cell = (256 / h.max(w)).clamp(2, 32);
    let (pw, ph) = (w * cell, h * cell);
    // A single stage would repeat the left panel; stage panels need two or more.
    let stage_panels = if plan.stages.len() > 1 {
        plan.stages.len()
    } else {
        0
    };
    let panels = 1 + stage_panels as u32;
    let mut img = RgbImage::from_pixel(panels * pw + (panels + 1) * GAP, ph + 2 * GAP, BACKGROUND);
    let reveal = plan.reveal_step();
    let stage_of = plan.stage_of_token();
    let last = plan.steps.len().saturating_sub(1).max(1) as f64;
    // (first, last) step colours of each adaptive stage.
    let mut striped: Vec<Option<(Rgb<u8>, Rgb<u8>)>> = vec![None; plan.stages.len()];
    for (s, step) in plan.steps.iter().enumerate() {
        if step.adaptive.is_some() {
            let c = colour(s as f64 / last);
            let entry = striped[step.stage].get_or_insert((c, c));
            entry.1 = c;
        }
    }
    // `fill`: two colours in diagonal stripes (the same twice: solid).
    let mut paint = |panel: u32, t: usize, fill: (Rgb<u8>, Rgb<u8>)| {
        let (i, j) = plan.grid.cell(t);
        let x0 = GAP + panel * (pw + GAP) + j as u32 * cell;
        let y0 = GAP + i as u32 * cell;
        let border = u32::from(cell >= 6);
        for y in y0..y0 + cell {
            for x in x0..x0 + cell {
                let edge = x < x0 + border || y < y0 + border;
                let c = if (x + y) / 2 % 2 == 1 { fill.1 } else { fill.0 };
                img.put_pixel(x, y, if edge { BACKGROUND } else { c });
            }
        }
    };
    for t in 0..plan.grid.len() {
        let c = colour(reveal[t] as f64 / last);
        let fill = striped[stage_of[t]].unwrap_or((c, c));
        paint(0, t, fill);
        for s in 0..stage_panels {
            let here = match stage_of[t].cmp(&s) {
                std::cmp::Ordering::Less => (KNOWN, KNOWN),
                std::cmp::Ordering::Equal => fill,
                std::cmp::Ordering::Greater => (LATER, LATER),
            };
            paint(1 + s as u32, t, here);
        }
    }
    img
}
