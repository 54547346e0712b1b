//! Which images a run makes: each image's class label and seed, and the
//! shard of the indices one process makes.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use super::RunError;
use crate::engine::ModelInfo;

/// Which class each image asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Classes {
    /// Balanced over all classes, in blocks (MAR's `arange(classes).repeat`).
    Balanced,
    /// The same class for every image.
    One(i64),
    /// These classes, cycled.
    List(Vec<i64>),
}

impl Classes {
    /// Refuses a class asked for that the model `info` lacks (balanced
    /// classes are the model's own), without making every image's label.
    pub fn check(&self, info: &ModelInfo) -> Result<(), RunError> {
        let asked: &[i64] = match self {
            Classes::Balanced => &[],
            Classes::One(c) => std::slice::from_ref(c),
            Classes::List(list) => list,
        };
        for &label in asked {
            crate::engine::check_label(info, label).map_err(RunError::Invalid)?;
        }
        Ok(())
    }
}

/// One of `n` contiguous parts of a run's image indices (`--shard K/N`).
///
/// Shards count from 0, as Kubernetes indexed Jobs (`JOB_COMPLETION_INDEX`)
/// and `sbatch --array=0-(N-1)` (`SLURM_ARRAY_TASK_ID`) do. Shard `k` of a
/// run of `num` images holds the indices `k·num/n .. (k+1)·num/n`: the parts
/// differ in size by at most one and together hold every index once, in
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    /// The image indices this shard holds in a run of `num_images`.
    pub fn range(self, num_images: usize) -> Range<usize> {
        let at = |k: usize| (k as u128 * num_images as u128 / self.n as u128) as usize;
        at(self.k)..at(self.k + 1)
    }

    /// Why a run of `num_images` cannot be split into these shards (more
    /// shards than images would leave some empty), if it cannot.
    pub fn unfit(self, num_images: usize) -> Option<String> {
        (self.n > num_images).then(|| {
            format!(
                "--shard {self}: {} shards of {num_images} images would leave shards empty; use at most {num_images} shards",
                self.n
            )
        })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

impl FromStr for Shard {
    type Err = String;

    /// Parses `K/N`; K must be in `0..N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (k, n) = s.split_once('/').ok_or_else(|| {
            format!("`{s}` is not K/N: give the shard's number K (from 0) and the number of shards N, e.g. 0/4")
        })?;
        let number = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| {
                format!("`{s}`: K and N must be whole numbers, e.g. 0/4 for the first of 4 shards")
            })
        };
        let (k, n) = (number(k)?, number(n)?);
        if n == 0 {
            return Err(format!(
                "`{s}`: N is the number of shards and must be at least 1"
            ));
        }
        if k >= n {
            return Err(format!(
                "shard {k}/{n} does not exist: shards count from 0, so K is 0 to {last} \
                 (with `sbatch --array=0-{last}`, pass $SLURM_ARRAY_TASK_ID/{n})",
                last = n - 1
            ));
        }
        Ok(Shard { k, n })
    }
}

/// The label of image `index` of `n` under `classes` for a model with
/// `count` classes (balanced on an unconditional model: `null`; classes
/// asked for are kept, for [`labels`] to refuse).
pub fn label_for(classes: &Classes, index: usize, n: usize, count: usize, null: i64) -> i64 {
    match classes {
        Classes::Balanced if count == 0 => null,
        Classes::Balanced => (index * count / n.max(1)) as i64,
        Classes::One(c) => *c,
        Classes::List(list) => list[index % list.len()],
    }
}

/// The label of every image of a run of `num_images` on the model `info`;
/// a class the model does not have is an error naming it.
pub fn labels(
    classes: &Classes,
    num_images: usize,
    info: &ModelInfo,
) -> Result<Vec<i64>, RunError> {
    // Balanced labels are the model's own classes (or its null class).
    classes.check(info)?;
    Ok((0..num_images)
        .map(|i| label_for(classes, i, num_images, info.classes, info.null_class))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_balanced_in_blocks_and_unconditional_models_use_null() {
        let labels: Vec<i64> = (0..20)
            .map(|i| label_for(&Classes::Balanced, i, 20, 10, 10))
            .collect();
        assert_eq!(
            labels,
            [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
        );
        let few: Vec<i64> = (0..4)
            .map(|i| label_for(&Classes::Balanced, i, 4, 10, 10))
            .collect();
        assert_eq!(few, [0, 2, 5, 7]);
        assert_eq!(label_for(&Classes::List(vec![3, 5]), 3, 8, 10, 10), 5);
        assert_eq!(label_for(&Classes::One(4), 7, 8, 10, 10), 4);
        assert_eq!(label_for(&Classes::Balanced, 3, 8, 0, 0), 0);
        // A class asked of an unconditional model is kept, and refused.
        assert_eq!(label_for(&Classes::One(4), 3, 8, 0, 7), 4);
        let mut info =
            crate::engine::MarModel::info(&crate::engine::fake::FakeModel::new()).clone();
        (info.classes, info.null_class) = (0, 7);
        let err = super::labels(&Classes::One(4), 2, &info)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("class 4 is out of range") && err.contains("unconditional"),
            "{err}"
        );
        assert_eq!(super::labels(&Classes::Balanced, 2, &info).unwrap(), [7, 7]);
        assert_eq!(super::labels(&Classes::One(7), 2, &info).unwrap(), [7, 7]);
    }

    #[test]
    fn shards_split_the_indices_into_contiguous_near_equal_parts() {
        for num in 1..40 {
            for n in 1..=num {
                let mut next = 0;
                for k in 0..n {
                    let r = Shard { k, n }.range(num);
                    assert_eq!(r.start, next, "{k}/{n} of {num}");
                    assert!(r.len() == num / n || r.len() == num / n + 1);
                    next = r.end;
                }
                assert_eq!(next, num);
            }
        }
        assert_eq!("3/8".parse::<Shard>(), Ok(Shard { k: 3, n: 8 }));
        assert_eq!("0 / 1".parse::<Shard>(), Ok(Shard { k: 0, n: 1 }));
        assert_eq!(Shard { k: 3, n: 8 }.to_string(), "3/8");
        let err = "8/8".parse::<Shard>().unwrap_err();
        assert!(err.contains("shards count from 0, so K is 0 to 7"), "{err}");
        assert!("3".parse::<Shard>().unwrap_err().contains("is not K/N"));
        assert!("1/0".parse::<Shard>().unwrap_err().contains("at least 1"));
    }
}
