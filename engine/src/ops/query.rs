//! The old home of the listings, split into [`page`](super::page), [`list`](super::list),
//! [`stuck`](super::stuck) and [`definitions`](super::definitions). Kept so that
//! `super::query::…` paths still resolve.

pub(crate) use super::list::{ListFilter, list};
pub(crate) use super::page::{MAX_PAGE, Page};
