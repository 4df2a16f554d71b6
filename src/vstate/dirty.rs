//! Which guest pages changed since the last snapshot: KVM's dirty log (the guest's writes) and
//! vm-memory's bitmap (the monitor's own writes: devices, the VM generation ID), joined page
//! by page, one bit a host page, in the words both of them use (bit `n % 64` of word `n / 64`
//! is page `n` of its memory slot).

use std::ops::Range;

/// One bitmap per memory region (KVM slot), in the regions' order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    regions: Vec<Vec<u64>>,
}

impl DirtyPages {
    pub fn new(regions: Vec<Vec<u64>>) -> Self {
        Self { regions }
    }

    /// Adds `other`'s pages to these (one VM's regions, of which either may have only the
    /// first few: a read of the logs that failed part way).
    pub fn add(&mut self, other: &DirtyPages) {
        if self.regions.len() < other.regions.len() {
            self.regions.resize(other.regions.len(), Vec::new());
        }
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (word, other_word) in mine.iter_mut().zip(theirs) {
                *word |= other_word;
            }
        }
    }

    /// The dirty pages of region `index`, as runs of page numbers, at most `pages` pages
    /// (bits past the region's end are ignored).
    pub fn runs(&self, index: usize, pages: usize) -> Vec<Range<usize>> {
        let Some(words) = self.regions.get(index) else {
            return Vec::new();
        };
        let dirty = |page: usize| {
            words
                .get(page / 64)
                .is_some_and(|word| word & (1 << (page % 64)) != 0)
        };
        let mut runs = Vec::new();
        let mut page = 0;
        while page < pages {
            // Whole clean words are skipped at once: most of a large guest is clean.
            if page % 64 == 0 && words.get(page / 64).copied().unwrap_or(0) == 0 {
                page += 64;
                continue;
            }
            if !dirty(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < pages && dirty(page) {
                page += 1;
            }
            runs.push(first..page);
        }
        runs
    }

    /// Whether page `page` of region `index` is dirty.
    pub fn is_dirty(&self, index: usize, page: usize) -> bool {
        self.regions
            .get(index)
            .and_then(|words| words.get(page / 64))
            .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    /// How many pages are dirty, all regions together.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_neighbouring_pages_across_words() {
        let mut first = vec![0u64; 3];
        first[0] = 0b1011 | 1 << 63; // pages 0, 1, 3 and 63
        first[1] = 0b1; // page 64, which continues 63's run
        first[2] = 1 << 10 | 1 << 63; // page 138; page 191 is past the end below
        let dirty = DirtyPages::new(vec![first, vec![0]]);
        assert_eq!(dirty.runs(0, 150), vec![0..2, 3..4, 63..65, 138..139]);
        assert_eq!(dirty.runs(1, 64), Vec::<Range<usize>>::new());
        assert_eq!(dirty.runs(2, 64), Vec::<Range<usize>>::new());
        assert!(dirty.is_dirty(0, 64) && !dirty.is_dirty(0, 65));
        assert_eq!(dirty.count(), 7);
    }

    #[test]
    fn adding_is_a_union_per_region() {
        let mut kvm = DirtyPages::new(vec![vec![0b0101], vec![0, 0]]);
        let devices = DirtyPages::new(vec![vec![0b0011], vec![0, 1 << 5]]);
        kvm.add(&devices);
        assert_eq!(kvm.runs(0, 64), vec![0..3]);
        assert_eq!(kvm.runs(1, 128), vec![69..70]);
        let mut none = DirtyPages::default();
        none.add(&kvm);
        assert_eq!(none, kvm);
        // Pages kept from a read that failed after the first region.
        let mut partial = DirtyPages::new(vec![vec![1 << 9]]);
        partial.add(&kvm);
        assert_eq!(partial.runs(0, 64), vec![0..3, 9..10]);
        assert_eq!(partial.runs(1, 128), vec![69..70]);
    }
}
