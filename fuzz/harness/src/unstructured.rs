//! Drawing choices from fuzz input bytes; past their end every draw is the smallest choice,
//! so any input, even an empty one, describes one case.

pub struct Unstructured<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Unstructured<'a> {
    pub fn new(data: &'a [u8]) -> Unstructured<'a> {
        Unstructured { data, pos: 0 }
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.data.get(self.pos).copied();
        self.pos += 1;
        b
    }

    /// A byte of the input, or `fallback` past its end.
    pub fn byte_or(&mut self, fallback: u8) -> u8 {
        self.next().unwrap_or(fallback)
    }

    /// An integer in `lo..=hi`.
    pub fn int(&mut self, lo: usize, hi: usize) -> usize {
        let span = hi - lo + 1;
        let mut v = 0usize;
        let mut range = 1usize;
        while range < span {
            v = (v << 8) | self.byte_or(0) as usize;
            range = range.saturating_mul(256);
        }
        lo + v % span
    }

    pub fn bool(&mut self) -> bool {
        self.byte_or(0) & 1 == 1
    }

    /// True with probability about `num / den`; past the input's end, the likelier answer.
    pub fn ratio(&mut self, num: u8, den: u8) -> bool {
        match self.next() {
            Some(b) => b % den < num,
            None => 2 * num > den,
        }
    }

    /// Any `i64`, from 8 bytes.
    pub fn i64(&mut self) -> i64 {
        i64::from_le_bytes(std::array::from_fn(|_| self.byte_or(0)))
    }
}
