//! Image-quality statistics on an evaluator's outputs: Gaussian feature
//! statistics and their Fréchet distance, class accuracy, and the
//! Inception-Score analogue on the classifier's probabilities.

use std::path::Path;

use nalgebra::{DMatrix, SymmetricEigen};
use ndarray::{Array1, Array2, ArrayView2, Axis};

/// Mean and covariance of feature vectors (covariance with N − 1, as numpy's
/// `np.cov` and the standard FID code compute it).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    pub mu: Array1<f64>,
    pub sigma: Array2<f64>,
    pub count: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{path}: {problem}")]
    Reference { path: String, problem: String },
    #[error("{0}")]
    Invalid(String),
}

impl FeatureStats {
    /// Statistics of the rows of `features` [N, F]; needs N ≥ 2.
    pub fn from_features(features: ArrayView2<f64>) -> Result<Self, StatsError> {
        let n = features.nrows();
        if n < 2 {
            return Err(StatsError::Invalid(format!(
                "a covariance needs at least 2 images, not {n}"
            )));
        }
        let mu = features.mean_axis(Axis(0)).expect("n >= 2");
        let centred = &features - &mu;
        let sigma = centred.t().dot(&centred) / (n as f64 - 1.0);
        Ok(FeatureStats {
            mu,
            sigma,
            count: n,
        })
    }

    /// Reads `mu` `[F]`, `sigma` [F, F] (f64) and optional `count` (i64 [])
    /// from an npz.
    pub fn load_npz(path: &Path) -> Result<Self, StatsError> {
        let err = |problem: String| StatsError::Reference {
            path: path.display().to_string(),
            problem,
        };
        let arrays = [("mu", 8), ("sigma", 8), ("count", 8)];
        let mut npz = crate::engine::npz::open_checked(path, &arrays).map_err(err)?;
        let mu: Array1<f64> = npz
            .by_name("mu")
            .map_err(|e| err(format!("array `mu` (f64 [F]): {e}")))?;
        let sigma: Array2<f64> = npz
            .by_name("sigma")
            .map_err(|e| err(format!("array `sigma` (f64 [F, F]): {e}")))?;
        // `count` may be absent (0: not known), but one that is there must
        // be an i64 scalar of at least 0.
        let names = npz.names().map_err(|e| err(e.to_string()))?;
        let has_count = names.iter().any(|n| n == "count" || n == "count.npy");
        let count = if has_count {
            let c = npz
                .by_name::<ndarray::OwnedRepr<i64>, ndarray::Ix0>("count")
                .map_err(|e| {
                    err(format!(
                        "array `count` (i64 [], the number of images measured): {e}"
                    ))
                })?;
            usize::try_from(c.into_scalar()).map_err(|_| {
                err("`count` is negative; it is the number of images measured".into())
            })?
        } else {
            0
        };
        let f = mu.len();
        if sigma.dim() != (f, f) {
            return Err(err(format!(
                "`sigma` is {:?}, expected [{f}, {f}] to match `mu`",
                sigma.shape()
            )));
        }
        if mu.iter().chain(sigma.iter()).any(|v| !v.is_finite()) {
            return Err(err("holds a non-finite value".into()));
        }
        if let Some(problem) = not_a_covariance(&sigma) {
            return Err(err(format!(
                "`sigma` is not a covariance matrix: {problem}"
            )));
        }
        Ok(FeatureStats { mu, sigma, count })
    }
}

/// Why `sigma` cannot be a covariance matrix (a distance to it would mean
/// nothing: a negative definite one gave FD 0), allowing for rounding: it
/// must be symmetric and have no eigenvalue below −1e-9 of its largest.
fn not_a_covariance(sigma: &Array2<f64>) -> Option<String> {
    let f = sigma.nrows();
    let scale = sigma.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tolerance = 1e-9 * scale.max(f64::MIN_POSITIVE);
    for i in 0..f {
        for j in 0..i {
            if (sigma[[i, j]] - sigma[[j, i]]).abs() > 1e-6 * scale {
                return Some(format!(
                    "[{i}, {j}] is {} but [{j}, {i}] is {} (not symmetric)",
                    sigma[[i, j]],
                    sigma[[j, i]]
                ));
            }
        }
    }
    let eig = SymmetricEigen::new(DMatrix::from_fn(f, f, |i, j| sigma[[i, j]]));
    let least = eig.eigenvalues.iter().fold(f64::INFINITY, |m, &v| m.min(v));
    let most = eig.eigenvalues.iter().fold(0.0f64, |m, &v| m.max(v));
    (least < -tolerance.max(1e-9 * most))
        .then(|| format!("it has a negative eigenvalue ({least:.3e})"))
}

/// The Fréchet distance between two Gaussians:
/// |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½.
///
/// The trace of the matrix square root is computed as Σᵢ √λᵢ of the
/// symmetric matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues as Σ₁ Σ₂), with tiny
/// negative eigenvalues from rounding clamped to 0.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64, StatsError> {
    let f = a.mu.len();
    if b.mu.len() != f {
        return Err(StatsError::Invalid(format!(
            "feature sizes differ: {f} and {}",
            b.mu.len()
        )));
    }
    let to_matrix = |m: &Array2<f64>| DMatrix::from_fn(f, f, |i, j| 0.5 * (m[[i, j]] + m[[j, i]]));
    let (s1, s2) = (to_matrix(&a.sigma), to_matrix(&b.sigma));
    let eig = SymmetricEigen::new(s1.clone());
    let root = DMatrix::from_diagonal(&eig.eigenvalues.map(|v| v.max(0.0).sqrt()));
    let s1_half = &eig.eigenvectors * root * eig.eigenvectors.transpose();
    let inner = &s1_half * &s2 * &s1_half;
    let inner = (&inner + inner.transpose()) * 0.5;
    let trace_sqrt: f64 = SymmetricEigen::new(inner)
        .eigenvalues
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum();
    let diff = &a.mu - &b.mu;
    let distance = diff.dot(&diff) + s1.trace() + s2.trace() - 2.0 * trace_sqrt;
    if !distance.is_finite() {
        // Features or a reference so large that their sums overflow f64.
        return Err(StatsError::Invalid(format!(
            "the Fréchet distance overflows ({distance}): features or reference values near f64's largest"
        )));
    }
    Ok(distance.max(0.0))
}

/// Softmax of each row of `logits` [N, K], in f64.
pub fn probabilities(logits: ArrayView2<f32>) -> Array2<f64> {
    let mut p = logits.mapv(f64::from);
    for mut row in p.rows_mut() {
        let max = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    p
}

/// The share of rows whose arg-max class is the requested label.
pub fn class_accuracy(logits: ArrayView2<f32>, labels: &[i64]) -> f64 {
    let correct = logits
        .rows()
        .into_iter()
        .zip(labels)
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv { (i, v) } else { (bi, bv) }
                })
                .0;
            best as i64 == **label
        })
        .count();
    correct as f64 / labels.len().max(1) as f64
}

/// The Inception-Score analogue on the evaluator's class probabilities:
/// exp(mean over images of KL(p(y|x) ‖ p(y))), between 1 and the number of
/// classes; higher means confident and diverse.
pub fn classifier_score(probabilities: &Array2<f64>) -> f64 {
    let marginal = probabilities.mean_axis(Axis(0)).unwrap_or_default();
    let kl: f64 = probabilities
        .rows()
        .into_iter()
        .map(|p| {
            p.iter()
                .zip(&marginal)
                .filter(|(pi, _)| **pi > 0.0)
                .map(|(pi, mi)| pi * (pi / mi).ln())
                .sum::<f64>()
        })
        .sum();
    (kl / probabilities.nrows().max(1) as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, array};

    /// A reference npz of `mu` [2], an identity `sigma` and `count` as
    /// `write` puts it (or not).
    fn reference(
        write: impl FnOnce(&mut ndarray_npy::NpzWriter<std::fs::File>),
    ) -> Result<FeatureStats, StatsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reference.npz");
        let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&path).unwrap());
        w.add_array("mu", &array![0.0f64, 1.0]).unwrap();
        w.add_array("sigma", &Array2::<f64>::eye(2)).unwrap();
        write(&mut w);
        w.finish().unwrap();
        FeatureStats::load_npz(&path)
    }

    #[test]
    fn a_references_count_is_an_i64_scalar_of_at_least_zero_or_absent() {
        assert_eq!(reference(|_| ()).unwrap().count, 0, "absent: not known");
        let five = reference(|w| w.add_array("count", &ndarray::arr0(5i64)).unwrap());
        assert_eq!(five.unwrap().count, 5);
        let negative = reference(|w| w.add_array("count", &ndarray::arr0(-1i64)).unwrap());
        assert!(
            negative
                .unwrap_err()
                .to_string()
                .contains("`count` is negative")
        );
        // A count of another type was read as absent.
        let float = reference(|w| w.add_array("count", &ndarray::arr0(1.5f64)).unwrap());
        let e = float.unwrap_err().to_string();
        assert!(e.contains("array `count` (i64 []"), "{e}");
    }

    fn stats(mu: Array1<f64>, sigma: Array2<f64>) -> FeatureStats {
        FeatureStats {
            mu,
            sigma,
            count: 0,
        }
    }

    #[test]
    fn distance_of_commuting_gaussians_has_its_closed_form() {
        // Diagonal covariances: Σ (μ₁ − μ₂)² + Σ (√a − √b)².
        let a = stats(
            array![0.0, 1.0, 2.0],
            Array::from_diag(&array![1.0, 4.0, 9.0]),
        );
        let b = stats(
            array![1.0, 1.0, 0.0],
            Array::from_diag(&array![4.0, 1.0, 9.0]),
        );
        let want = 1.0 + 0.0 + 4.0 + 1.0 + 1.0 + 0.0;
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
        // Values whose sums overflow are an error, not an infinite distance.
        let huge = FeatureStats {
            mu: a.mu.mapv(|_| 1e300),
            sigma: a.sigma.mapv(|v| v * 1e307),
            count: a.count,
        };
        assert!(frechet_distance(&huge, &a).is_err());
    }

    #[test]
    fn distance_is_symmetric_and_rotation_invariant_for_non_commuting_covariances() {
        let s1 = array![[2.0, 0.5], [0.5, 1.0]];
        let s2 = array![[1.0, -0.3], [-0.3, 3.0]];
        let a = stats(array![0.5, -1.0], s1.clone());
        let b = stats(array![0.0, 2.0], s2.clone());
        let ab = frechet_distance(&a, &b).unwrap();
        let ba = frechet_distance(&b, &a).unwrap();
        assert!((ab - ba).abs() < 1e-9);
        let (c, s) = (0.3f64.cos(), 0.3f64.sin());
        let r = array![[c, -s], [s, c]];
        let rot = |m: &Array2<f64>| r.dot(m).dot(&r.t());
        let ra = stats(r.dot(&a.mu), rot(&s1));
        let rb = stats(r.dot(&b.mu), rot(&s2));
        assert!((frechet_distance(&ra, &rb).unwrap() - ab).abs() < 1e-9);
        // 2x2 closed form: tr √(S1 S2) = √(tr(S1 S2) + 2 √det(S1 S2)).
        let p = s1.dot(&s2);
        let det = p[[0, 0]] * p[[1, 1]] - p[[0, 1]] * p[[1, 0]];
        let tr_sqrt = (p[[0, 0]] + p[[1, 1]] + 2.0 * det.sqrt()).sqrt();
        let want = 0.25 + 9.0 + 3.0 + 4.0 - 2.0 * tr_sqrt;
        assert!((ab - want).abs() < 1e-9, "{ab} vs {want}");
    }

    #[test]
    fn feature_statistics_use_n_minus_one() {
        let f = array![[1.0, 0.0], [3.0, 2.0], [5.0, 1.0]];
        let s = FeatureStats::from_features(f.view()).unwrap();
        assert_eq!(s.mu, array![3.0, 1.0]);
        assert_eq!(s.sigma, array![[4.0, 1.0], [1.0, 1.0]]);
        assert!(FeatureStats::from_features(f.slice(ndarray::s![..1, ..])).is_err());
    }

    #[test]
    fn accuracy_and_classifier_score() {
        let logits = array![[5.0f32, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]];
        assert_eq!(class_accuracy(logits.view(), &[0, 1, 1, 1]), 0.75);
        // Confident and balanced over 2 classes: close to 2; all one class: 1.
        let score = classifier_score(&probabilities((logits * 10.0).view()));
        assert!((score - 2.0).abs() < 1e-6, "{score}");
        let same = array![[5.0f32, 0.0], [5.0, 0.0]];
        assert!((classifier_score(&probabilities(same.view())) - 1.0).abs() < 1e-9);
    }
}
