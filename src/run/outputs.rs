//! What a run writes besides `run.json`: each image as a PNG, the preview
//! `grid.png` and the `.npz` of all images.

use std::cell::RefCell;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage, RgbImage};
use ndarray_npy::npy::header::{Header, Layout};
use ndarray_npy::{NpzWriter, WritableElement, WriteNpyError, WriteNpyExt};

use super::RunError;
use super::folder::image_path;
use crate::fsutil::{write_atomic, write_atomic_with};

/// PNG bytes of one image given as [H, W, channels] u8.
pub fn encode_png(pixels: &ndarray::Array3<u8>) -> Vec<u8> {
    let (h, w, ch) = pixels.dim();
    let data: Vec<u8> = pixels.iter().copied().collect();
    let img = if ch == 1 {
        DynamicImage::ImageLuma8(
            GrayImage::from_raw(w as u32, h as u32, data).expect("sized buffer"),
        )
    } else {
        DynamicImage::ImageRgb8(RgbImage::from_raw(w as u32, h as u32, data).expect("sized buffer"))
    };
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .expect("PNG encoding to memory");
    bytes
}

/// The PNG of each image of a batch of pixels [B, H, W, channels], encoded
/// in parallel (the engine's thread pool).
pub fn encode_batch(pixels: ndarray::ArrayView4<u8>) -> Vec<Vec<u8>> {
    use rayon::prelude::*;
    (0..pixels.dim().0)
        .into_par_iter()
        .map(|k| encode_png(&pixels.index_axis(ndarray::Axis(0), k).to_owned()))
        .collect()
}

/// `grid.png`: the images tiled, one row per class when the classes are
/// balanced (a single row when there is one image per class), else in a
/// near-square grid.
pub(super) fn write_grid(
    out: &Path,
    n: usize,
    labels: &[i64],
    classes: usize,
) -> Result<(), RunError> {
    let images = (0..n)
        .map(|i| read_back(&image_path(out, i)))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(first) = images.first() else {
        return Ok(());
    };
    let (w, h) = first.dimensions();
    let cols = grid_columns(n, labels, classes);
    let rows = n.div_ceil(cols);
    let gap = 2u32;
    let mut grid = RgbImage::from_pixel(
        cols as u32 * (w + gap) + gap,
        rows as u32 * (h + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        image::imageops::replace(
            &mut grid,
            img,
            (gap + c as u32 * (w + gap)) as i64,
            (gap + r as u32 * (h + gap)) as i64,
        );
    }
    let mut bytes = Vec::new();
    DynamicImage::ImageRgb8(grid)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("PNG encoding to memory");
    let path = out.join("grid.png");
    write_atomic(&path, &bytes).map_err(|source| RunError::Write { path, source })
}

/// The columns of `grid.png` for `n` images of `labels` on a model of
/// `classes` classes: a row per class when every class has as many images
/// and the labels come in class order, else a near-square grid.
fn grid_columns(n: usize, labels: &[i64], classes: usize) -> usize {
    let per_class_rows = classes > 0
        && n.is_multiple_of(classes)
        && n >= classes
        && labels.windows(2).all(|p| p[0] <= p[1]);
    if per_class_rows {
        // One image per class: a single row, in class order.
        match n / classes {
            1 => n,
            per_class => per_class,
        }
    } else {
        (n as f64).sqrt().ceil() as usize
    }
}

/// An image file as 8-bit RGB; grey images have their channel repeated.
fn read_back(path: &Path) -> Result<RgbImage, RunError> {
    image::open(path)
        .map(|img| img.to_rgb8())
        .map_err(|e| RunError::Invalid(format!("reading back {}: {e}", path.display())))
}

/// Writes the images `indices` of the output folder `dir`, in order, as
/// `path`: an `.npz` holding one array `arr_0`, uint8 [N, H, W, 3] (the
/// layout of the common FID evaluators; grey images are repeated to three
/// channels), with the pixels of the PNGs. The PNGs are read back one at a
/// time while the file is written (memory stays at one image), and the file
/// appears only once complete. The bytes depend only on the pixels.
pub fn write_npz(path: &Path, dir: &Path, indices: Range<usize>) -> Result<(), RunError> {
    let paths: Vec<PathBuf> = indices.map(|i| image_path(dir, i)).collect();
    let Some(first) = paths.first() else {
        return Err(RunError::Invalid(format!(
            "{}: no images to write",
            path.display()
        )));
    };
    let stack = PngStack {
        first: read_back(first)?,
        paths: &paths,
        failure: RefCell::new(None),
    };
    let (w, h) = stack.first.dimensions();
    let bytes = paths.len() as u64 * w as u64 * h as u64 * 3;
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        // A fixed date, so that the same images give the same bytes.
        .last_modified_time(zip::DateTime::default())
        .large_file(bytes > u32::MAX as u64 - (1 << 16));
    let written = write_atomic_with(path, |file| {
        let mut npz = NpzWriter::new_with_options(file, options);
        npz.add_array("arr_0", &stack)
            .and_then(|()| npz.finish().map(|_| ()))
            .map_err(std::io::Error::other)
    });
    match (written, stack.failure.into_inner()) {
        (_, Some(failure)) => Err(failure),
        (Err(source), None) => Err(RunError::Write {
            path: path.to_path_buf(),
            source,
        }),
        (Ok(()), None) => Ok(()),
    }
}

/// PNG files seen as one uint8 [N, H, W, 3] array, decoded one at a time
/// as it is written; a file that cannot be read, or whose size differs from
/// the first's, is kept in `failure`.
struct PngStack<'a> {
    first: RgbImage,
    paths: &'a [PathBuf],
    failure: RefCell<Option<RunError>>,
}

impl WriteNpyExt for PngStack<'_> {
    fn write_npy<W: Write>(&self, mut w: W) -> Result<(), WriteNpyError> {
        let (width, height) = self.first.dimensions();
        Header {
            type_descriptor: u8::type_descriptor(),
            layout: Layout::Standard,
            shape: vec![self.paths.len(), height as usize, width as usize, 3],
        }
        .write(&mut w)?;
        w.write_all(self.first.as_raw())?;
        for path in &self.paths[1..] {
            let img = read_back(path).and_then(|img| {
                if img.dimensions() == (width, height) {
                    Ok(img)
                } else {
                    Err(RunError::Invalid(format!(
                        "{} is {}x{}, but {} is {width}x{height}; the images of one array must have one size",
                        path.display(),
                        img.width(),
                        img.height(),
                        self.paths[0].display()
                    )))
                }
            });
            match img {
                Ok(img) => w.write_all(img.as_raw())?,
                Err(e) => {
                    let message = e.to_string();
                    *self.failure.borrow_mut() = Some(e);
                    return Err(std::io::Error::other(message).into());
                }
            }
        }
        w.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Axis;

    /// A row per class for balanced runs in class order (one row when
    /// each class has one image), else a near-square grid.
    #[test]
    fn the_grid_has_a_row_per_class_when_the_classes_are_balanced() {
        let balanced = |n: usize, classes: usize| -> Vec<i64> {
            (0..n).map(|i| (i * classes / n) as i64).collect()
        };
        assert_eq!(grid_columns(20, &balanced(20, 10), 10), 2);
        assert_eq!(grid_columns(10, &balanced(10, 10), 10), 10);
        // Not a multiple of the classes, labels out of order, fewer images
        // than classes, an unconditional model: near-square.
        assert_eq!(grid_columns(21, &balanced(21, 10), 10), 5);
        let cycled: Vec<i64> = (0..20).map(|i| i % 10).collect();
        assert_eq!(grid_columns(20, &cycled, 10), 5);
        assert_eq!(grid_columns(3, &[0, 3, 6], 10), 2);
        assert_eq!(grid_columns(9, &[10; 9], 0), 3);
    }

    /// Image k sits at row k / columns, column k % columns, 2 pixels apart.
    #[test]
    fn the_grid_tiles_the_images_in_order() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        for k in 0..4u8 {
            let img = ndarray::Array3::from_elem((3, 5, 3), 40 * (k + 1));
            std::fs::write(image_path(dir, k as usize), encode_png(&img)).unwrap();
        }
        write_grid(dir, 4, &[0, 0, 1, 1], 2).unwrap();
        let grid = image::open(dir.join("grid.png")).unwrap().to_rgb8();
        assert_eq!(grid.dimensions(), (2 * (5 + 2) + 2, 2 * (3 + 2) + 2));
        for k in 0..4u32 {
            let (x, y) = (2 + (k % 2) * 7, 2 + (k / 2) * 5);
            let want = 40 * (k as u8 + 1);
            assert_eq!(grid.get_pixel(x, y).0, [want; 3], "image {k}");
            assert_eq!(grid.get_pixel(x + 4, y + 2).0, [want; 3], "image {k}");
        }
        assert_eq!(grid.get_pixel(0, 0).0, [255; 3]);
    }

    #[test]
    fn npz_repeats_grey_images_to_three_channels_and_refuses_mixed_sizes() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().to_path_buf();
        let grey = ndarray::Array3::from_shape_fn((2, 3, 1), |(i, j, _)| (10 * i + j) as u8);
        let rgb =
            ndarray::Array3::from_shape_fn((2, 3, 3), |(i, j, c)| (100 + 10 * i + j + c) as u8);
        std::fs::write(image_path(&dir, 0), encode_png(&grey)).unwrap();
        std::fs::write(image_path(&dir, 1), encode_png(&rgb)).unwrap();
        let npz = dir.join("x.npz");
        write_npz(&npz, &dir, 0..2).unwrap();
        let mut r = ndarray_npy::NpzReader::new(std::fs::File::open(&npz).unwrap()).unwrap();
        let arr: ndarray::Array4<u8> = r.by_name("arr_0").unwrap();
        assert_eq!(arr.dim(), (2, 2, 3, 3));
        for c in 0..3 {
            assert_eq!(
                arr.slice(ndarray::s![0, .., .., c]),
                grey.slice(ndarray::s![.., .., 0])
            );
        }
        assert_eq!(arr.index_axis(Axis(0), 1), rgb);

        let small = ndarray::Array3::<u8>::zeros((1, 1, 3));
        std::fs::write(image_path(&dir, 2), encode_png(&small)).unwrap();
        let other = dir.join("y.npz");
        let err = write_npz(&other, &dir, 0..3).unwrap_err().to_string();
        assert!(err.contains("00002.png is 1x1, but"), "{err}");
        assert!(err.contains("00000.png is 3x2"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 4, "no partial file is left: {left:?}");
    }
}
