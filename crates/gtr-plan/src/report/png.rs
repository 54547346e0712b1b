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

fn cell_size(plan: &Plan) -> u32 {
    let (h, w) = (plan.grid.height as u32, plan.grid.width as u32);
    (256 / h.max(w)).clamp(2, 32)
}

/// Whether [`render`] draws a panel per stage: with two or more stages (one
/// would repeat the left panel) when the picture stays within
/// [`MAX_PIXELS`].
pub fn has_stage_panels(plan: &Plan) -> bool {
    let cell = u64::from(cell_size(plan));
    let (pw, ph) = (
        plan.grid.width as u64 * cell,
        plan.grid.height as u64 * cell,
    );
    let panels = 1 + plan.stages.len() as u64;
    let pixels = (panels * pw + (panels + 1) * u64::from(GAP)) * (ph + 2 * u64::from(GAP));
    plan.stages.len() > 1 && pixels <= MAX_PIXELS
}

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

/// The most pixels a picture with stage panels may have (about 100 MB in
/// memory); past it only the left panel is drawn.
pub const MAX_PIXELS: u64 = 1 << 25;

/// Renders the plan; cells are square, sized so a 16×16 grid is 256 px.
/// The stage panels are left out where they would make the picture larger
/// than [`MAX_PIXELS`] (thousands of stages; see [`has_stage_panels`]).
pub fn render(plan: &Plan) -> RgbImage {
    let (h, w) = (plan.grid.height as u32, plan.grid.width as u32);
    let cell = cell_size(plan);
    let (pw, ph) = (w * cell, h * cell);
    let stage_panels = if has_stage_panels(plan) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::Grid;
    use crate::schedule::{Schedule, Source};

    fn plan_of(text: &str, grid: Grid) -> Plan {
        let schedule =
            Schedule::from_source(Source::new("t.gtr", text), &Default::default()).unwrap();
        crate::plan::plan(&schedule, grid, 0).unwrap()
    }

    /// Each token's cell has its reveal step's colour on the left, and in
    /// the stage panels its own stage's colour, grey where an earlier stage
    /// revealed it and white where a later one will.
    #[test]
    fn cells_show_their_step_and_stage() {
        let plan = plan_of(
            "stage a { tokens i == 0  order raster  steps 2 }\nstage b { tokens rest  order raster  steps 1 }",
            Grid::new(2, 2),
        );
        let img = render(&plan);
        let cell = cell_size(&plan);
        assert_eq!(cell, 32);
        let at = |panel: u32, t: usize| {
            let (i, j) = plan.grid.cell(t);
            let x = GAP + panel * (2 * cell + GAP) + j as u32 * cell + cell / 2;
            *img.get_pixel(x, GAP + i as u32 * cell + cell / 2)
        };
        // Steps 0, 1, 2 of 3: the first, middle and last colours.
        let (first, middle, last) = (colour(0.0), colour(0.5), colour(1.0));
        assert_eq!(first, Rgb([68, 1, 84]));
        assert_eq!(
            [at(0, 0), at(0, 1), at(0, 2), at(0, 3)],
            [first, middle, last, last]
        );
        assert_eq!(
            [at(1, 0), at(1, 1), at(1, 2), at(1, 3)],
            [first, middle, LATER, LATER]
        );
        assert_eq!(
            [at(2, 0), at(2, 1), at(2, 2), at(2, 3)],
            [KNOWN, KNOWN, last, last]
        );
        // Each cell's top-left border is the background.
        assert_eq!(*img.get_pixel(GAP, GAP), BACKGROUND);
    }

    /// Thousands of stages would ask for gigabytes; the picture keeps
    /// within MAX_PIXELS by leaving their panels out.
    #[test]
    fn pictures_stay_within_their_pixel_budget() {
        let two = plan_of(
            "stage a { tokens i == 0  steps 1 }\nstage b { tokens rest  steps 1 }",
            Grid::MAR,
        );
        assert!(has_stage_panels(&two));
        assert_eq!(render(&two).width(), 3 * 256 + 4 * GAP);
        let text: String = (0..4096)
            .map(|k| format!("stage q{k} {{ tokens j == {k}  steps 1 }}\n"))
            .collect();
        let many = plan_of(&text, Grid::new(16, 4096));
        assert!(!has_stage_panels(&many));
        let img = render(&many);
        assert!(u64::from(img.width()) * u64::from(img.height()) <= MAX_PIXELS);
    }
}
