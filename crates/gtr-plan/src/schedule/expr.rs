//! Type checking and evaluation of schedule expressions.
//!
//! Expressions have one of two types: numbers (`f64`) and conditions on a
//! grid cell (`bool`). Which names may appear depends on where the expression
//! is written; a [`Scope`] says so, and a [`Env`] supplies values.

use std::sync::Arc;

use super::ast::{BinaryOp, Expr, ExprKind, Ident, UnaryOp, Vocabulary};
use super::diagnostic::{Diagnostic, Source, Span};

/// The type of an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Number,
    Condition,
}

impl Type {
    fn noun(self) -> &'static str {
        match self {
            Type::Number => "a number",
            Type::Condition => "a condition",
        }
    }
}

/// A function of numbers, written `abs(x)`: each takes and gives numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Abs,
    Min,
    Max,
    Sqrt,
    /// `hypot(a, b)` = sqrt(a² + b²).
    Hypot,
}

impl Vocabulary for Func {
    const ALL: &'static [Self] = &[Func::Abs, Func::Min, Func::Max, Func::Sqrt, Func::Hypot];
    const NOUN: Option<&'static str> = Some("a function");

    fn name(self) -> &'static str {
        match self {
            Func::Abs => "abs",
            Func::Min => "min",
            Func::Max => "max",
            Func::Sqrt => "sqrt",
            Func::Hypot => "hypot",
        }
    }
}

impl Func {
    /// The fewest and most arguments it takes.
    pub fn arity(self) -> (usize, usize) {
        match self {
            Func::Abs | Func::Sqrt => (1, 1),
            Func::Hypot => (2, 2),
            Func::Min | Func::Max => (2, usize::MAX),
        }
    }

    /// Its value on `args` (whose count [`Func::arity`] allows).
    pub fn apply(self, args: &[f64]) -> f64 {
        match self {
            Func::Abs => args[0].abs(),
            Func::Sqrt => args[0].sqrt(),
            Func::Hypot => args[0].hypot(args[1]),
            Func::Min => args.iter().copied().fold(f64::INFINITY, f64::min),
            Func::Max => args.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// What a name means where an expression is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A `param`, known before any grid is chosen.
    Param,
    /// `h` or `w`, the grid's size.
    GridSize,
    /// `i` or `j`, the cell's row or column.
    Cell,
    /// A token set (`set` or partition name): a condition on the cell.
    Set,
}

/// The names visible to an expression, and whether `rest`/`all` and cell
/// coordinates may be used.
pub trait Scope {
    fn lookup(&self, name: &str) -> Option<NameKind>;
    /// Whether `rest` is meaningful here (only in a stage's `tokens`).
    fn allows_rest(&self) -> bool;
    /// A sentence naming what may be used here, for "unknown name" errors.
    fn describe(&self) -> String;
    /// Why `name`, used at `at`, which [`Scope::lookup`] does not find,
    /// cannot be used there when the file declares it below or as
    /// something else.
    fn misuse(&self, _source: &Source, _name: &str, _at: Span) -> Option<String> {
        None
    }
}

/// Values for the names of a [`Scope`].
pub trait Env {
    fn number(&self, name: &str) -> f64;
    fn condition(&self, name: &str) -> bool;
    fn rest(&self) -> bool;
}

/// Checks `expr` has type `want` in `scope`, or says precisely what is wrong.
pub fn check(
    source: &Arc<Source>,
    expr: &Expr,
    want: Type,
    scope: &dyn Scope,
) -> Result<(), Diagnostic> {
    let got = type_of(source, expr, scope)?;
    if got == want {
        return Ok(());
    }
    let diag = Diagnostic::new(
        source,
        expr.span,
        format!("this is {}, but {} is needed here", got.noun(), want.noun()),
    );
    Err(match want {
        Type::Condition => diag.with_help(
            "a token set is a condition on row `i` and column `j`, e.g. `(i + j) % 4 == 0`",
        ),
        Type::Number => {
            diag.with_help("write a number or an arithmetic expression over parameters")
        }
    })
}

fn type_of(source: &Arc<Source>, expr: &Expr, scope: &dyn Scope) -> Result<Type, Diagnostic> {
    match &expr.kind {
        ExprKind::Number(v) => {
            if v.is_finite() {
                Ok(Type::Number)
            } else {
                Err(Diagnostic::new(
                    source,
                    expr.span,
                    "this number is too large",
                ))
            }
        }
        ExprKind::Bool(_) | ExprKind::All => Ok(Type::Condition),
        ExprKind::Rest => {
            if scope.allows_rest() {
                Ok(Type::Condition)
            } else {
                Err(Diagnostic::new(
                    source,
                    expr.span,
                    "`rest` (the tokens no earlier stage took) only has a meaning in a stage's `tokens`",
                ))
            }
        }
        ExprKind::Name(name) => match scope.lookup(name) {
            Some(NameKind::Set) => Ok(Type::Condition),
            Some(_) => Ok(Type::Number),
            None => Err(unknown_name(source, expr, name, scope)),
        },
        ExprKind::Unary(op, inner) => {
            let want = match op {
                UnaryOp::Neg => Type::Number,
                UnaryOp::Not => Type::Condition,
            };
            check(source, inner, want, scope)?;
            Ok(want)
        }
        ExprKind::Binary(op, lhs, rhs) => {
            let (operand, result) = match op {
                BinaryOp::Add
                | BinaryOp::Sub
                | BinaryOp::Mul
                | BinaryOp::Div
                | BinaryOp::FloorDiv
                | BinaryOp::Rem => (Type::Number, Type::Number),
                BinaryOp::Eq
                | BinaryOp::Ne
                | BinaryOp::Lt
                | BinaryOp::Le
                | BinaryOp::Gt
                | BinaryOp::Ge => (Type::Number, Type::Condition),
                BinaryOp::And | BinaryOp::Or => (Type::Condition, Type::Condition),
            };
            for side in [lhs, rhs] {
                let got = type_of(source, side, scope)?;
                if got != operand {
                    return Err(Diagnostic::new(
                        source,
                        side.span,
                        format!(
                            "`{}` needs {} on each side, but this is {}",
                            op.symbol(),
                            operand.noun(),
                            got.noun()
                        ),
                    ));
                }
            }
            Ok(result)
        }
        ExprKind::Call(name, args) => {
            let func = function(source, name, args.len())?;
            for arg in args {
                let got = type_of(source, arg, scope)?;
                if got != Type::Number {
                    return Err(Diagnostic::new(
                        source,
                        arg.span,
                        format!(
                            "`{}` takes numbers, but this is {}",
                            func.name(),
                            got.noun()
                        ),
                    ));
                }
            }
            Ok(Type::Number)
        }
    }
}

/// The function `name` names, if it takes `count` arguments.
fn function(source: &Arc<Source>, name: &Ident, count: usize) -> Result<Func, Diagnostic> {
    let func = Func::from_name(&name.name).ok_or_else(|| {
        Diagnostic::new(
            source,
            name.span,
            format!("unknown function `{}`", name.name),
        )
        .with_help(format!("the functions are {}", Func::choices()))
    })?;
    let (least, most) = func.arity();
    if (least..=most).contains(&count) {
        return Ok(func);
    }
    let wanted = match (least, most) {
        (1, 1) => "one number".to_string(),
        (a, b) if a == b => format!("{a} numbers"),
        (a, _) => format!("{a} or more numbers"),
    };
    Err(Diagnostic::new(
        source,
        name.span,
        format!("`{}` takes {wanted}, not {count}", name.name),
    )
    .with_help("e.g. `abs(i - h / 2)`, `min(i, j)`, `max(i, j, 2)`, `sqrt(i)`, `hypot(i, j)`"))
}

fn unknown_name(source: &Arc<Source>, expr: &Expr, name: &str, scope: &dyn Scope) -> Diagnostic {
    let what = match name {
        "i" | "j" => {
            format!("`{name}` (the cell's row or column) only has a meaning in a token set")
        }
        _ => scope
            .misuse(source, name, expr.span)
            .unwrap_or_else(|| format!("unknown name `{name}`")),
    };
    // In a token set, a misspelt `all` or `rest` (`tokens al`).
    let in_token_set = scope.lookup("i") == Some(NameKind::Cell);
    let keyword = ["all", "rest"]
        .into_iter()
        .filter(|k| *k == "all" || scope.allows_rest())
        .find(|k| in_token_set && at_most_one_edit(name, k));
    let help = match keyword {
        Some(k) => format!("did you mean `{k}`? Otherwise, {}", scope.describe()),
        None => scope.describe(),
    };
    Diagnostic::new(source, expr.span, what).with_help(help)
}

/// Whether `a` becomes `b` by at most one insertion, deletion or change of
/// a character.
pub(crate) fn at_most_one_edit(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let (short, long) = if a.len() <= b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    if long.len() - short.len() > 1 {
        return false;
    }
    let prefix = short
        .iter()
        .zip(long.iter())
        .take_while(|(x, y)| x == y)
        .count();
    if prefix == short.len() {
        return true;
    }
    // Past the first difference: one character changed, or one more in
    // the longer.
    let skip = usize::from(short.len() == long.len());
    short[prefix + skip..] == long[prefix + 1..]
}

/// Evaluates a number. The expression must have been checked.
pub fn number(expr: &Expr, env: &dyn Env) -> f64 {
    match &expr.kind {
        ExprKind::Number(v) => *v,
        ExprKind::Name(name) => env.number(name),
        ExprKind::Unary(UnaryOp::Neg, inner) => -number(inner, env),
        ExprKind::Call(name, args) => {
            let args: Vec<f64> = args.iter().map(|a| number(a, env)).collect();
            Func::from_name(&name.name).map_or(f64::NAN, |f| f.apply(&args))
        }
        ExprKind::Binary(op, lhs, rhs) => {
            let (a, b) = (number(lhs, env), number(rhs, env));
            match op {
                BinaryOp::Add => a + b,
                BinaryOp::Sub => a - b,
                BinaryOp::Mul => a * b,
                BinaryOp::Div => a / b,
                BinaryOp::FloorDiv => (a / b).floor(),
                BinaryOp::Rem => a.rem_euclid(b),
                _ => f64::NAN,
            }
        }
        _ => f64::NAN,
    }
}

/// Evaluates a condition. The expression must have been checked.
pub fn condition(expr: &Expr, env: &dyn Env) -> bool {
    match &expr.kind {
        ExprKind::Bool(b) => *b,
        ExprKind::All => true,
        ExprKind::Rest => env.rest(),
        ExprKind::Name(name) => env.condition(name),
        ExprKind::Unary(UnaryOp::Not, inner) => !condition(inner, env),
        ExprKind::Binary(op, lhs, rhs) => match op {
            BinaryOp::And => condition(lhs, env) && condition(rhs, env),
            BinaryOp::Or => condition(lhs, env) || condition(rhs, env),
            BinaryOp::Eq => number(lhs, env) == number(rhs, env),
            BinaryOp::Ne => number(lhs, env) != number(rhs, env),
            BinaryOp::Lt => number(lhs, env) < number(rhs, env),
            BinaryOp::Le => number(lhs, env) <= number(rhs, env),
            BinaryOp::Gt => number(lhs, env) > number(rhs, env),
            BinaryOp::Ge => number(lhs, env) >= number(rhs, env),
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::at_most_one_edit;

    #[test]
    fn one_edit_apart() {
        for (a, b) in [
            ("al", "all"),
            ("all", "all"),
            ("alll", "all"),
            ("aXl", "all"),
            ("res", "rest"),
        ] {
            assert!(at_most_one_edit(a, b), "{a} {b}");
        }
        for (a, b) in [("a", "all"), ("lal", "all"), ("rets", "rest"), ("", "al")] {
            assert!(!at_most_one_edit(a, b), "{a} {b}");
        }
    }
}
