//! The syntax tree of a `.gtr` file, as written: names are not yet resolved
//! and numbers may still be expressions over parameters.

use super::diagnostic::Span;

/// A name with the place it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Rem => "%",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }
}

/// An expression: a number, or a condition on a grid cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Number(f64),
    Bool(bool),
    /// `all`: every cell.
    All,
    /// `rest`: cells no earlier stage took.
    Rest,
    Name(String),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
}

/// One declaration or stage, in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Param {
        name: Ident,
        value: Expr,
    },
    Grid {
        height: usize,
        width: usize,
        span: Span,
    },
    Partition {
        levels: Expr,
        prefix: Option<Ident>,
        span: Span,
    },
    Set {
        name: Ident,
        cells: Expr,
    },
    Setting(Setting),
    Stage(StageAst),
}

/// A clause that is a default at top level and an override inside a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Diffusion(DiffusionAst),
    Cfg(CfgAst),
    Temperature(Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageAst {
    pub name: Ident,
    pub span: Span,
    pub clauses: Vec<StageClause>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StageClause {
    Tokens(Expr),
    Order(OrderAst),
    Steps(StepCountAst),
    Fts(FtsAst),
    Setting(Setting),
}

impl StageClause {
    /// The keyword that starts the clause, for "written twice" errors.
    pub fn keyword(&self) -> &'static str {
        match self {
            StageClause::Tokens(_) => "tokens",
            StageClause::Order(_) => "order",
            StageClause::Steps(s) => match s.count {
                StepCountKind::Rate(..) => "rate",
                _ => "steps",
            },
            StageClause::Fts(_) => "fts",
            StageClause::Setting(Setting::Diffusion(_)) => "diffusion",
            StageClause::Setting(Setting::Cfg(_)) => "cfg",
            StageClause::Setting(Setting::Temperature(_)) => "temperature",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    Random,
    Raster,
    Halton { roll: bool },
    Subsample,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderAst {
    pub kind: OrderKind,
    pub span: Span,
}

/// How a stage's tokens are spread over its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Distribution {
    /// MAR's cosine rule (mar.md §2.2) applied to the stage's tokens.
    Cosine,
    /// As equal as integers allow.
    #[default]
    Uniform,
    /// Halton-MaskGIT's arccos rule (mar.md §6.2).
    Arccos,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepCountKind {
    /// `steps N [distribution]`
    Steps(Expr, Distribution),
    /// `rate R [distribution]`: R tokens per step on average.
    Rate(Expr, Distribution),
    /// `steps [a, b, c]`: exact tokens per step.
    List(Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepCountAst {
    pub count: StepCountKind,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampShape {
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Round half to even (as Python and numpy do).
    #[default]
    Round,
    /// Round down (as `int()` does for DiSA's chain index).
    Floor,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DiffusionKind {
    Constant(Expr),
    Ramp {
        shape: RampShape,
        from: Expr,
        to: Expr,
        rounding: Rounding,
        across: Option<(Ident, Ident)>,
    },
    List(Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionAst {
    pub kind: DiffusionKind,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    HighFreq,
    LowFreq,
    Random,
    All,
}

impl Selector {
    pub fn name(self) -> &'static str {
        match self {
            Selector::HighFreq => "high_freq",
            Selector::LowFreq => "low_freq",
            Selector::Random => "random",
            Selector::All => "all",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FtsAst {
    /// The fraction β; `None` for `fts all`.
    pub fraction: Option<Expr>,
    pub selector: Selector,
    pub steps: Expr,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CfgKind {
    None,
    Constant(Expr),
    Linear(Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CfgAst {
    pub kind: CfgKind,
    pub span: Span,
}

/// A whole file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleAst {
    pub items: Vec<Item>,
}
